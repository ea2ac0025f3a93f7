"""The data module: tokenizer, splits, training windows, validation pass, download."""

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from gptnano.data import CharTokenizer, EvalWindows, ShakespeareDataModule, TrainWindows, download, read_text
from gptnano.errors import UserError
from tests.conftest import make_text


def test_tokenizer_round_trip_and_sorted_vocab():
    text = make_text(5000)
    tok = CharTokenizer.from_text(text)
    assert tok.vocab == "".join(sorted(set(text)))
    assert len(tok) == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.max() < len(tok)
    assert tok.decode(ids.tolist()) == text


def test_tokenizer_names_unknown_characters():
    tok = CharTokenizer("abc ")
    with pytest.raises(UserError, match=r"'x'.*'z'"):
        tok.encode("a zax")


def test_split_is_contiguous_90_10(text_file):
    dm = ShakespeareDataModule(path=str(text_file))
    dm.block_size = 16
    dm.setup("fit")
    data = dm.tokenizer.encode(text_file.read_text())
    n = len(data)
    assert len(dm.splits["train"]) == int(0.9 * n)
    assert torch.equal(torch.cat([dm.splits["train"], dm.splits["val"]]), data)
    assert len(dm.splits["test"]) == 0


def test_test_fraction_carves_the_end(text_file):
    dm = ShakespeareDataModule(path=str(text_file), test_fraction=0.05)
    dm.block_size = 16
    dm.setup("fit")
    n = len(text_file.read_text())
    assert len(dm.splits["test"]) == n - int(0.95 * n)
    assert len(dm.splits["train"]) == int(0.85 * n)
    assert torch.equal(torch.cat(list(dm.splits.values())), dm.tokenizer.encode(text_file.read_text()))


def test_training_windows_are_a_function_of_seed_step_rank():
    data = torch.arange(1000)
    def windows(seed, rank):
        return TrainWindows(data, block_size=8, batch_size=4, seed=seed, rank=rank, start=lambda: 0)
    x1, y1 = windows(1, 0).batch(7)
    x2, y2 = windows(1, 0).batch(7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 8)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
    assert torch.equal(x1[:, 1:] - x1[:, :-1], torch.ones(4, 7, dtype=torch.long))  # contiguous windows
    assert not torch.equal(windows(1, 1).batch(7)[0], x1)  # another DDP rank
    assert not torch.equal(windows(1, 0).batch(8)[0], x1)  # another step
    assert not torch.equal(windows(2, 0).batch(7)[0], x1)  # another seed


def test_training_stream_starts_at_the_trainer_step():
    data = torch.arange(1000)
    ds = TrainWindows(data, block_size=8, batch_size=4, seed=0, rank=0, start=lambda: 5)
    first = next(iter(ds))
    assert torch.equal(first[0], ds.batch(5)[0])


@pytest.mark.parametrize("n,block", [(101, 10), (100, 10), (57, 8), (9, 8)])
def test_validation_scores_every_target_exactly_once(n, block):
    data = torch.arange(n)
    def scored(ds):
        out = []
        for x, y in ds:
            assert x.shape[1] == block
            out += y[y != -100].tolist()
        return out
    single = scored(EvalWindows(data, block, batch_size=3))
    assert sorted(single) == list(range(1, n))  # every character after the first, once
    shards = [scored(EvalWindows(data, block, batch_size=3, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(1, n))


def test_read_text_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    with pytest.raises(UserError, match="byte offset 6"):
        read_text(tmp_path / "bad.txt")


def test_split_shorter_than_a_window_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 10)  # val split: 10 characters
    dm = ShakespeareDataModule(path=str(path))
    dm.block_size = 32
    with pytest.raises(UserError, match="val split .* fewer than block_size"):
        dm.setup("fit")


def test_vocabulary_from_checkpoint_must_cover_the_text(text_file):
    dm = ShakespeareDataModule(path=str(text_file), vocab="abc")
    dm.block_size = 8
    with pytest.raises(UserError, match="not in the model's vocabulary"):
        dm.setup("validate")


# ----- download, against a server on 127.0.0.1 ----------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate = False

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.truncate:  # promise more bytes than are sent
            body = b"x" * 100
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "input.txt").write_text(make_text(3000))

    def start(truncate=False):
        handler = type("H", (_Handler,), {"truncate": truncate})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    servers = []
    yield root, start
    for s in servers:
        s.shutdown()
        s.server_close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_success_checks_sha256(server, tmp_path):
    root, start = server
    url = start()
    digest = hashlib.sha256((root / "input.txt").read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "input.txt"
    download(f"{url}/input.txt", dest, digest)
    assert dest.read_bytes() == (root / "input.txt").read_bytes()
    assert _leftovers(dest.parent) == ["input.txt"]  # no temp file left


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    _, start = server
    dest = tmp_path / "cache" / "input.txt"
    with pytest.raises(UserError, match="checksum mismatch .*--data.path"):
        download(f"{start()}/input.txt", dest, "0" * 64)
    assert _leftovers(dest.parent) == []


def test_download_404_leaves_nothing(server, tmp_path):
    _, start = server
    dest = tmp_path / "cache" / "input.txt"
    url = f"{start()}/missing.txt"
    with pytest.raises(UserError, match=f"{url}: HTTP 404"):
        download(url, dest)
    assert _leftovers(dest.parent) == []


def test_download_truncated_leaves_nothing(server, tmp_path):
    _, start = server
    dest = tmp_path / "cache" / "input.txt"
    with pytest.raises(UserError, match="truncated|could not download"):
        download(f"{start(truncate=True)}/input.txt", dest)
    assert _leftovers(dest.parent) == []


def test_download_offline_is_a_clear_error(tmp_path):
    dest = tmp_path / "cache" / "input.txt"
    with pytest.raises(UserError, match="could not download http://127.0.0.1:9/x.txt"):
        download("http://127.0.0.1:9/x.txt", dest, timeout=5)
    assert _leftovers(dest.parent) == []
