"""The data module: tokenizer, splits, training windows, validation pass, download."""

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

import gptnano.data.cache as corpus
from gptnano.data.cache import Corpus
from gptnano.data.datamodule import ShakespeareDataModule
from gptnano.data.text import download, read_text
from gptnano.data.tokenizer import CharTokenizer
from gptnano.data.windows import EvalWindows, TrainWindows
from gptnano.errors import UserError
from gptnano.models import GPT
from tests.helpers import make_text

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the token cache goes to ./data/prepared


def as_tensor(split) -> torch.Tensor:
    return torch.from_numpy(np.asarray(split, dtype=np.int64))


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
    assert torch.equal(torch.cat([as_tensor(dm.splits["train"]), as_tensor(dm.splits["val"])]), data)
    assert len(dm.splits["test"]) == 0


def test_test_fraction_carves_the_end(text_file):
    dm = ShakespeareDataModule(path=str(text_file), test_fraction=0.05)
    dm.block_size = 16
    dm.setup("fit")
    n = len(text_file.read_text())
    assert len(dm.splits["test"]) == n - int(0.95 * n)
    assert len(dm.splits["train"]) == int(0.85 * n)
    assert torch.equal(torch.cat([as_tensor(v) for v in dm.splits.values()]), dm.tokenizer.encode(text_file.read_text()))


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


@pytest.mark.parametrize("n,block,batch,world,max_windows", [(101, 10, 3, 2, None), (57, 8, 3, 3, None),
                                                             (9, 8, 1, 2, None), (1001, 10, 4, 3, 5)])
def test_every_rank_runs_as_many_validation_batches(n, block, batch, world, max_windows):
    """A DDP forward can be a collective: a rank with one batch fewer would leave the others waiting."""
    counts = [len(list(EvalWindows(torch.arange(n), block, batch, r, world, max_windows))) for r in range(world)]
    assert len(set(counts)) == 1, counts


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


# ----- the prepared cache seen from the data module -------------------------
def _old_windows(text: str, block: int, batch: int, seed: int, steps: int, rank: int, eval_batch: int, world: int):
    """Batches exactly as the in-memory path made them before the cache: the whole text
    encoded to one int64 tensor by a dict lookup per character, split 90/10."""
    tok = CharTokenizer.from_text(text)
    data = torch.tensor([tok.stoi[c] for c in text], dtype=torch.long)
    a = int(len(data) * 0.9)
    train, val = data[:a], data[a:]
    batches = []
    for step in range(steps):
        g = torch.Generator().manual_seed(hash((seed, step, rank)) % 2**63)
        starts = torch.randint(len(train) - block, (batch,), generator=g)
        rows = train[starts[:, None] + torch.arange(block + 1)]
        batches.append((rows[:, :-1], rows[:, 1:]))
    n_targets = len(val) - 1
    starts = list(range(0, n_targets - block + 1, block))
    tail = n_targets - len(starts) * block
    if tail:
        starts.append(n_targets - block)
    evals = []
    for chunk in torch.tensor(starts[rank::world], dtype=torch.long).split(eval_batch):
        rows = val[chunk[:, None] + torch.arange(block + 1)]
        x, y = rows[:, :-1], rows[:, 1:].clone()
        if tail:
            y[chunk == starts[-1], : block - tail] = -100
        evals.append((x, y))
    return train, val, batches, evals


def _loss(net, batches) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += F.cross_entropy(net(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
            n += (y != -100).sum().item()
    return total / n


CORPORA = {"made-up": lambda: make_text(60_000, seed=3),
           "tiny shakespeare": lambda: SHAKESPEARE.read_text(encoding="utf-8")}


@pytest.mark.parametrize("name", CORPORA)
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_same_split_windows_and_validation_loss_as_the_in_memory_path(tmp_path, name, rank, world):
    if name == "tiny shakespeare" and not SHAKESPEARE.exists():
        pytest.skip(f"needs the shared copy of tiny Shakespeare at {SHAKESPEARE}")
    text = CORPORA[name]()
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    block, seed = 64, 1337
    train, val, old_batches, old_evals = _old_windows(text, block, 12, seed, 5, rank, 64, world)

    dm = ShakespeareDataModule(path=str(path), batch_size=12, eval_batch_size=64, seed=seed)
    dm.block_size = block
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab == CharTokenizer.from_text(text).vocab
    assert torch.equal(as_tensor(dm.splits["train"]), train) and torch.equal(as_tensor(dm.splits["val"]), val)
    windows = TrainWindows(dm.splits["train"], block, 12, seed, rank, lambda: 0)
    for step, (x, y) in enumerate(old_batches):
        new_x, new_y = windows.batch(step)
        assert new_x.dtype == torch.long and torch.equal(new_x, x) and torch.equal(new_y, y)
    new_evals = list(EvalWindows(dm.splits["val"], block, 64, rank, world))
    assert len(new_evals) == len(old_evals)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(new_evals, old_evals))
    torch.manual_seed(0)
    net = GPT(vocab_size=dm.vocab_size, block_size=block, n_layer=1, n_head=2, n_embd=16).eval()
    assert _loss(net, new_evals) == _loss(net, old_evals)


def test_val_tokens_scores_a_fixed_evenly_spread_subset():
    data = torch.arange(1001)  # 1000 targets: 100 windows of 10
    full = EvalWindows(data, 10, batch_size=3)
    part = EvalWindows(data, 10, batch_size=3, max_windows=8)

    def starts(ds):
        return torch.cat([x[:, 0] for x, _ in ds]).tolist()
    assert starts(part) == [10 * (j * 100 // 8) for j in range(8)] == [0, 120, 250, 370, 500, 620, 750, 870]
    assert starts(part) == starts(part)  # the same subset at every validation
    assert part.scored_tokens == sum((y != -100).sum().item() for _, y in part) == 80
    shards = [starts(EvalWindows(data, 10, 3, rank=r, world_size=2, max_windows=8)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == starts(part)  # DDP scores the same windows
    assert starts(EvalWindows(data, 10, 3, max_windows=500)) == starts(full)
    assert full.scored_tokens == 1000


def test_val_tokens_through_the_data_module_and_its_log_line(text_file, capsys):
    dm = ShakespeareDataModule(path=str(text_file), val_tokens=100, eval_batch_size=4)
    dm.block_size = 16
    dm.setup("fit")
    scored = sum((y != -100).sum().item() for _, y in dm.val_dataloader())
    assert scored == 7 * 16  # ceil(100 / 16) windows
    val = len(dm.splits["val"]) - 1
    assert f"validation scores 112 of the split's {val:,} tokens" in capsys.readouterr().err
    with pytest.raises(UserError, match="val_tokens must be a positive number of tokens or 'all'"):
        ShakespeareDataModule(path=str(text_file), val_tokens=0)


def test_validation_stays_bounded_as_the_text_grows(text_file, capsys, monkeypatch):
    """Issue 19, item 11: by default a split beyond FULL_PASS_TOKENS is scored on DEFAULT_VAL_TOKENS
    evenly spread (before: a full pass whatever its size, ~50 minutes per 1000-step run on a 300 MB
    text), said in one line; "all" asks for the full pass; a split under the bound keeps it."""
    import gptnano.data.datamodule as datamodule

    def scored(**kw):
        dm = ShakespeareDataModule(path=str(text_file), eval_batch_size=4, **kw)
        dm.block_size = 16
        dm.setup("fit")
        return sum((y != -100).sum().item() for _, y in dm.val_dataloader()), len(dm.splits["val"]) - 1

    n, val = scored()
    assert n == val and "validation scores" not in capsys.readouterr().err  # small: the full pass, silently
    monkeypatch.setattr(datamodule, "FULL_PASS_TOKENS", 1000)
    monkeypatch.setattr(datamodule, "DEFAULT_VAL_TOKENS", 320)
    n, val = scored()
    assert n == 320 and val > 1000
    assert (f"validation scores 320 of the split's {val:,} tokens" in (err := capsys.readouterr().err)
            and "default beyond 1,000 tokens; --data.val_tokens all scores all" in err)
    n, val = scored(val_tokens="all")
    assert n == val and "validation scores" not in capsys.readouterr().err


@pytest.mark.parametrize("accelerator,pinned", [(CPUAccelerator(), False), (CUDAAccelerator(), True)])
def test_batches_are_pinned_only_for_cuda(text_file, accelerator, pinned):
    dm = ShakespeareDataModule(path=str(text_file), test_fraction=0.1)
    dm.block_size = 16
    dm.setup("fit")
    dm.trainer = SimpleNamespace(accelerator=accelerator, global_rank=0, world_size=1, global_step=0,
                                 accumulate_grad_batches=1)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert loader.pin_memory is pinned


def test_vocab_size_comes_from_the_prepared_text_without_reading_it(text_file, monkeypatch):
    monkeypatch.setattr(corpus, "RACY_NS", -10**18)  # trust a file written just now
    first = ShakespeareDataModule(path=str(text_file))
    first.block_size = 16
    first.prepare_data()

    def no_reading(*args):
        raise AssertionError("the text was read again")
    monkeypatch.setattr(corpus, "read_units", no_reading)
    again = ShakespeareDataModule(path=str(text_file))
    assert again.vocab_size == first.vocab_size == len(set(text_file.read_text()))
    assert again.vocab == first.vocab


def test_other_ranks_read_what_rank_zero_prepared(text_file, monkeypatch):
    """Lightning runs prepare_data on rank 0 and setup everywhere: rank 1 must only read."""
    rank0 = ShakespeareDataModule(path=str(text_file))
    rank0.block_size = 16
    rank0.prepare_data()
    rank0.setup("fit")

    def no_building(*args):
        raise AssertionError("rank 1 tokenised the text again")
    monkeypatch.setattr(Corpus, "_build", no_building)
    rank1 = ShakespeareDataModule(path=str(text_file))
    rank1.block_size = 16
    rank1.setup("fit")
    assert rank1.prepared.path == rank0.prepared.path
    assert np.array_equal(rank1.splits["train"], rank0.splits["train"])


def test_byte_tokenizer_reads_any_file(tmp_path):
    path = tmp_path / "mixed.bin"
    raw = (b"plain text, " + "ünïcödé ".encode() + b"\xff\xfe\x00 binary ") * 40
    path.write_bytes(raw)
    dm = ShakespeareDataModule(path=str(path), tokenizer="byte")
    assert dm.vocab_size == 256 and dm.vocab == ""
    dm.block_size = 16
    dm.setup("fit")
    assert np.concatenate([dm.splits["train"], dm.splits["val"]]).tobytes() == raw
    assert dm.tokenizer.decode(np.asarray(dm.splits["train"][:20]).tolist()) == raw[:20].decode("utf-8", "replace")


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
