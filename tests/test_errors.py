"""Every mistake a user can make gets one clear line on stderr, a non-zero exit
status, no Python traceback, and nothing written or lost."""

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import TINY_GPT, make_text, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained checkpoint and the text it was trained on."""
    work = tmp_path_factory.mktemp("trained")
    text = work / "tiny.txt"
    text.write_text(make_text(), encoding="utf-8")
    run_cli(["fit", *TINY_GPT, "--data.path", str(text), "--trainer.max_steps", "2"], work)
    return work / "checkpoints" / "gpt" / "last.ckpt", text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "input.txt").write_text("not the real corpus\n" * 100)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/truncated.txt":
                self.send_response(200)
                self.send_header("Content-Length", "5000")
                self.end_headers()
                self.wfile.write(b"x" * 10)
                return
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _write(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


# (case id, function (tmp, ckpt, text, url) -> argv, regex the error line must match)
CASES = [
    ("data-missing", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(t / "nope.txt")], r"data file not found: .*nope\.txt"),
    ("data-empty", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", _write(t, "e.txt", b"")], r"data file is empty"),
    ("data-short", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", _write(t, "s.txt", b"abcdefghij" * 10)],
     r"val split .* has 10 characters, fewer than block_size \+ 1 = 17"),
    ("data-not-utf8", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", _write(t, "b.txt", b"hello\n" * 50 + b"\xc3\x28")],
     r"not valid UTF-8 \(byte offset 300"),
    ("download-offline", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.url", "http://127.0.0.1:9/input.txt"],
     r"could not download http://127\.0\.0\.1:9/input\.txt: .*--data\.path"),
    ("download-404", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.url", f"{u}/missing.txt"], r"HTTP 404"),
    ("download-truncated", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.url", f"{u}/truncated.txt"], r"truncated|could not download"),
    ("download-checksum", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.url", f"{u}/input.txt"], r"checksum mismatch"),
    ("prompt-unknown-chars", lambda t, c, x, u: ["predict", "--ckpt_path", str(c), "--data.prompt", "ROMEO€~"],
     r"characters not in the model's vocabulary: '~', '€'"),
    ("ckpt-missing", lambda t, c, x, u: ["predict", "--ckpt_path", str(t / "none.ckpt")], r"checkpoint not found"),
    ("ckpt-truncated", lambda t, c, x, u: ["predict", "--ckpt_path", _write(t, "cut.ckpt", c.read_bytes()[: c.stat().st_size // 2])],
     r"not a readable gptnano checkpoint"),
    ("ckpt-not-a-checkpoint", lambda t, c, x, u: ["validate", "--ckpt_path", str(x)], r"not a readable gptnano checkpoint"),
    ("ckpt-other-vocabulary", lambda t, c, x, u: ["validate", "--ckpt_path", str(c), "--data.path", _write(t, "o.txt", "xyzw\n".encode() * 500)],
     r"characters not in the model's vocabulary .*different text"),
    ("max-steps-zero", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(x), "--trainer.max_steps", "0"],
     r"--trainer.max_steps must be a positive number of optimizer steps, got 0"),
    ("max-steps-negative", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(x), "--trainer.max_steps", "-1"],
     r"--trainer.max_steps must be a positive number of optimizer steps, got -1"),
    ("ckpt-is-a-folder", lambda t, c, x, u: ["validate", "--ckpt_path", str(t)], r"checkpoint is a folder, not a file"),
    ("resume-without-checkpoint", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(x), "--ckpt_path", "last"],
     r"no checkpoints/gpt/last\.ckpt to resume"),
    ("n_embd-not-divisible", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(x), "--model.net.n_head", "3"], r"divisible by n_head"),
    ("non-positive-size", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(x), "--model.net.n_layer", "0"], r"n_layer must be a positive"),
    ("dropout-out-of-range", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(x), "--model.net.dropout", "1.5"], r"dropout must be in \[0, 1\)"),
    ("cnn-receptive-field", lambda t, c, x, u: ["fit", "--model.net", "CNN", "--model.net.n_layer", "1", "--model.net.block_size", "256",
                                                "--data.path", str(x)], r"receptive field"),
    ("unknown-architecture", lambda t, c, x, u: ["fit", "--model.net", "Transformer9", "--data.path", str(x)], r"unknown architecture 'Transformer9'"),
    ("bad-learning-rate", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(x), "--model.learning_rate", "-1"], r"learning_rate > 0"),
    ("prompt-file-not-utf8", lambda t, c, x, u: ["predict", "--ckpt_path", str(c), "--data.prompt_file", _write(t, "p.txt", b"RO\xffMEO")],
     r"p\.txt is not valid UTF-8 \(byte offset 2: b'\\xff'\)"),
    ("data-path-is-a-folder", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", str(t)], r"data file .* is a folder, not a file"),
    ("data-one-character", lambda t, c, x, u: ["fit", *TINY_GPT, "--data.path", _write(t, "a.txt", b"a" * 1000)],
     r"one character repeated \('a' x 1000\): there is nothing to learn"),
    ("prompt-empty", lambda t, c, x, u: ["predict", "--ckpt_path", str(c), "--data.prompt", ""], r"--data\.prompt is empty"),
]


@pytest.mark.parametrize("case,make_args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, make_args, message, trained, server, tmp_path, gptnano):
    ckpt, text = trained
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    proc = gptnano(make_args(tmp_path, ckpt, text, server), tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gptnano: error: "), proc.stderr[-2000:]
    import re
    assert re.search(message, last), last
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before  # nothing overwritten
    assert not (tmp_path / "checkpoints").exists()  # nothing half-made
    leftovers = list((tmp_path / "data").rglob("*")) if (tmp_path / "data").exists() else []
    assert not [p for p in leftovers if p.is_file()]  # no partial download


def test_generating_past_the_context_crops_instead_of_failing(trained, tmp_path):
    ckpt, _ = trained  # block_size 16
    out = run_cli(["predict", "--ckpt_path", str(ckpt), "--data.prompt", "ROMEO:", "--model.max_new_tokens", "100",
                   "--model.sample_seed", "0"], tmp_path)
    text = out.stdout.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 100
