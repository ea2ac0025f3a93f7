"""Every mistake a user can make gets one clear line on stderr, a non-zero exit
status, no Python traceback, and nothing written or lost."""

import hashlib
import http.server
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from tests.helpers import TINY_GPT, make_text, run_cli

ROOT = Path(__file__).resolve().parents[1]


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


def _rnn(w) -> str:
    """A checkpoint of an RNN: the trained GPT's, renamed (what the export tool reads before anything else)."""
    import inspect

    from gptnano.models import RNN

    saved = torch.load(w.ckpt, weights_only=True)
    takes = inspect.signature(RNN).parameters  # the GPT's own options (n_head, rope, ...) are not the RNN's
    args = {k: v for k, v in saved["hyper_parameters"]["net"]["init_args"].items() if k in takes}
    saved["hyper_parameters"]["net"] = {"class_path": "gptnano.models.RNN", "init_args": args}

    saved["state_dict"] = {f"net.{k}": v for k, v in RNN(**args).state_dict().items()}
    torch.save(saved, w.tmp / "rnn.ckpt")
    return str(w.tmp / "rnn.ckpt")


def _non_finite(tmp: Path, ckpt: Path) -> str:
    """A copy of ``ckpt`` with one weight set to NaN."""
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"]["net.blocks.0.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(saved, tmp / "nan.ckpt")
    return str(tmp / "nan.ckpt")


NAN = r"nan\.ckpt holds non-finite weights \(NaN or infinity\) in net\.blocks\.0\.mlp\.c_fc\.weight: refusing"


class Where(NamedTuple):
    """What a case's command line may name."""

    tmp: Path  # the test's own empty folder (the command runs there)
    ckpt: Path  # a tiny trained checkpoint
    text: Path  # the text it was trained on
    url: str  # a local web server: /input.txt (not the real corpus), /truncated.txt


class Case(NamedTuple):
    id: str
    argv: Callable[[Where], list[str]]  # the command line, given where things are
    error: str  # a regular expression the one error line must match


CASES = [
    Case("data-missing", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.tmp / "nope.txt")], r"data file not found: .*nope\.txt"),
    Case("data-empty", lambda w: ["fit", *TINY_GPT, "--data.path", _write(w.tmp, "e.txt", b"")], r"data file is empty"),
    Case("data-short", lambda w: ["fit", *TINY_GPT, "--data.path", _write(w.tmp, "s.txt", b"abcdefghij" * 10)],
     r"val split .* has 10 characters, fewer than block_size \+ 1 = 17"),
    Case("data-not-utf8", lambda w: ["fit", *TINY_GPT, "--data.path", _write(w.tmp, "b.txt", b"hello\n" * 50 + b"\xc3\x28")],
     r"not valid UTF-8 \(byte offset 300"),
    Case("download-offline", lambda w: ["fit", *TINY_GPT, "--data.url", "http://127.0.0.1:9/input.txt"],
     r"could not download http://127\.0\.0\.1:9/input\.txt: .*--data\.path"),
    Case("download-404", lambda w: ["fit", *TINY_GPT, "--data.url", f"{w.url}/missing.txt"], r"HTTP 404"),
    Case("download-truncated", lambda w: ["fit", *TINY_GPT, "--data.url", f"{w.url}/truncated.txt"], r"truncated|could not download"),
    Case("download-checksum", lambda w: ["fit", *TINY_GPT, "--data.url", f"{w.url}/input.txt"], r"checksum mismatch"),
    Case("prompt-unknown-chars", lambda w: ["predict", "--ckpt_path", str(w.ckpt), "--data.prompt", "ROMEO€~"],
     r"characters not in the model's vocabulary: '~', '€'"),
    Case("ckpt-missing", lambda w: ["predict", "--ckpt_path", str(w.tmp / "none.ckpt")], r"checkpoint not found"),
    Case("ckpt-truncated", lambda w: ["predict", "--ckpt_path", _write(w.tmp, "cut.ckpt", w.ckpt.read_bytes()[: w.ckpt.stat().st_size // 2])],
     r"not a readable gptnano checkpoint"),
    Case("ckpt-not-a-checkpoint", lambda w: ["validate", "--ckpt_path", str(w.text)], r"not a readable gptnano checkpoint"),
    Case("ckpt-other-vocabulary", lambda w: ["validate", "--ckpt_path", str(w.ckpt), "--data.path", _write(w.tmp, "o.txt", "xyzw\n".encode() * 500)],
     r"characters not in the model's vocabulary .*different text"),
    Case("max-steps-zero", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--trainer.max_steps", "0"],
     r"--trainer.max_steps must be a positive number of optimizer steps, or -1 with --trainer\.max_epochs or "
     r"--trainer\.max_time to bound the run, got 0"),
    Case("max-steps-negative", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--trainer.max_steps", "-1"],
     r"--trainer.max_steps must be .*, or -1 with --trainer\.max_epochs or --trainer\.max_time to bound the run, got -1"),
    Case("ckpt-is-a-folder", lambda w: ["validate", "--ckpt_path", str(w.tmp)], r"checkpoint is a folder, not a file"),
    Case("resume-without-checkpoint", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--ckpt_path", "last"],
     r"no checkpoints/gpt/last\.ckpt to resume"),
    Case("n_embd-not-divisible", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--model.net.n_head", "3"], r"divisible by n_head"),
    Case("non-positive-size", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--model.net.n_layer", "0"], r"n_layer must be a positive"),
    Case("dropout-out-of-range", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--model.net.dropout", "1.5"], r"dropout must be in \[0, 1\)"),
    Case("cnn-receptive-field", lambda w: ["fit", "--model.net", "CNN", "--model.net.n_layer", "1", "--model.net.block_size", "256",
                                                "--data.path", str(w.text)], r"receptive field"),
    Case("unknown-architecture", lambda w: ["fit", "--model.net", "Transformer9", "--data.path", str(w.text)], r"unknown architecture 'Transformer9'"),
    Case("bad-learning-rate", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--model.learning_rate", "-1"], r"learning_rate > 0"),
    Case("bad-cooldown-fraction", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--model.lr_schedule", "wsd",
                                             "--model.cooldown_fraction", "1.5"], r"0 <= cooldown_fraction <= 1"),
    Case("prompt-file-not-utf8", lambda w: ["predict", "--ckpt_path", str(w.ckpt), "--data.prompt_file", _write(w.tmp, "p.txt", b"RO\xffMEO")],
     r"p\.txt is not valid UTF-8 \(byte offset 2: b'\\xff'\)"),
    Case("data-path-is-a-folder", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.tmp)], r"data file .* is a folder, not a file"),
    Case("data-one-character", lambda w: ["fit", *TINY_GPT, "--data.path", _write(w.tmp, "a.txt", b"a" * 1000)],
     r"one character repeated \('a' x 1000\): there is nothing to learn"),
    Case("prompt-empty", lambda w: ["predict", "--ckpt_path", str(w.ckpt), "--data.prompt", ""], r"--data\.prompt is empty"),
    Case("ckpt-non-finite-generate", lambda w: ["generate", "--ckpt_path", _non_finite(w.tmp, w.ckpt), "--temperature", "0"], NAN),
    Case("ckpt-non-finite-predict", lambda w: ["predict", "--ckpt_path", _non_finite(w.tmp, w.ckpt)], NAN),
    Case("ckpt-non-finite-validate", lambda w: ["validate", "--ckpt_path", _non_finite(w.tmp, w.ckpt), "--data.path", str(w.text)], NAN),
    Case("init-from-and-ckpt-path", lambda w: ["fit", "--init_from", str(w.ckpt), "--ckpt_path", str(w.ckpt), "--data.path", str(w.text)],
     r"--init_from starts a new run .* --ckpt_path resumes a run: give one of them"),
    Case("init-from-other-size", lambda w: ["fit", "--init_from", str(w.ckpt), "--model.net.n_layer", "3", "--data.path", str(w.text)],
     r"cannot take n_layer=3 \(its weights: 1\): the network and its sizes come from the trained model"),
    Case("init-from-other-architecture", lambda w: ["fit", "--config", str(ROOT / "configs" / "rnn.yaml"), "--init_from", str(w.ckpt),
                                                    "--data.path", str(w.text)], r"holds a GPT network, but --config or --model.net ask for RNN"),
    Case("init-from-its-own-folder", lambda w: ["fit", "--init_from", str(w.ckpt), "--checkpoint.dirpath", str(w.ckpt.parent),
                                                "--data.path", str(w.text)], r"the new run needs a folder of its own"),
    Case("init-from-not-fit", lambda w: ["validate", "--init_from", str(w.ckpt), "--data.path", str(w.text)], r"--init_from is for fit"),
    Case("export-hf-of-an-rnn", lambda w: ["export", "--ckpt_path", _rnn(w), "--out", str(w.tmp / "hf"), "--format", "hf"],
     r"--format hf is not available for RNN: use safetensors or onnx"),
    # Issue 19, item 6: settings that cannot work are found before the first step (before: tracebacks).
    Case("val-check-interval-zero", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--trainer.val_check_interval", "0"],
     r"--trainer\.val_check_interval must be a positive number of steps between validations, a fraction of an "
     r"epoch, or a duration, got 0"),
    Case("accumulate-zero", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--trainer.accumulate_grad_batches", "0"],
     r"--trainer\.accumulate_grad_batches must be a whole number >= 1, got 0"),
    Case("patience-negative", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--early_stopping.patience", "-1"],
     r"--early_stopping\.patience must be a whole number of validations >= 0, got -1"),
    Case("min-lr-above-lr", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--model.min_lr", "1e-2"],
     r"min_lr 0\.01 is above learning_rate 0\.001"),
    Case("beta-one", lambda w: ["fit", *TINY_GPT, "--data.path", str(w.text), "--model.beta1", "1"], r"0 <= beta1 < 1"),
    # Item 9: `last` / `best` without a run to look in (before: "required: predict.model.net").
    Case("last-without-run-name", lambda w: ["predict", "--ckpt_path", "last"],
     r"--ckpt_path last needs --run_name NAME \(or --config FILE\) to find checkpoints/NAME/last\.ckpt"),
    Case("best-of-unknown-run", lambda w: ["predict", "--run_name", "nope", "--ckpt_path", "best"],
     r"--ckpt_path best: no checkpoints/nope/best\.ckpt to predict from"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(case, trained, server, tmp_path, gptnano):
    ckpt, text = trained
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    proc = gptnano(case.argv(Where(tmp_path, ckpt, text, server)), tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gptnano: error: "), proc.stderr[-2000:]
    import re
    assert re.search(case.error, last), last
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


def test_divergence_in_pure_fp16_names_the_cause(tmp_path, gptnano):
    """Issue 19, item 6: `--trainer.precision 16-true` diverges at step 1 even at lr 1e-9 (AdamW's eps
    underflows in fp16); the line used to blame the learning rate."""
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    ran = gptnano(["fit", *TINY_GPT, "--data.path", "tiny.txt", "--trainer.precision", "16-true",
                   "--model.learning_rate", "1e-9", "--model.min_lr", "1e-9", "--trainer.max_steps", "5",
                   "--trainer.val_check_interval", "5"], tmp_path)
    last = ran.stderr.strip().splitlines()[-1]
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert last.startswith("gptnano: error: training stopped: the ") and "pure fp16 (--trainer.precision 16-true)" in last, last


@pytest.mark.parametrize("flag, missing", [("--trainer.logger+=CSVLogger", "trainer.logger.save_dir"),
                                           ("--trainer.callbacks+=EarlyStopping", "trainer.callbacks.monitor")])
def test_a_lightning_class_missing_an_argument_is_one_line_naming_the_flag(tmp_path, gptnano, flag, missing):
    """jsonargparse explains such a value over a dozen lines (why it fits none of the key's types);
    the CLI says the one that matters, and the flag that fixes it, before any training."""
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    ran = gptnano(["fit", *TINY_GPT, "--data.path", "tiny.txt", flag, "--trainer.max_steps", "2"], tmp_path)
    error = [line for line in ran.stderr.splitlines() if "error:" in line]
    assert ran.returncode == 2 and len(error) == 1 and "Subtypes" not in ran.stderr, ran.stderr
    assert error[0].endswith(f"the following arguments are required: {missing.rsplit('.', 1)[1]} (give --{missing} "
                             "VALUE after it)"), error[0]
    assert not (tmp_path / "checkpoints").exists()


class _Base:
    pass


class _Needs(_Base):
    def __init__(self, save_dir: str, threshold: float | None = None):
        self.save_dir, self.threshold = save_dir, threshold


def test_one_problem_condenses_only_a_class_s_one_line_reason():
    """On jsonargparse's own messages: a missing argument becomes one line; a nested reason (a value
    of the class's own argument that fits none of its types) and any other message stay whole."""
    from argparse import ArgumentError

    from jsonargparse import ArgumentParser

    from gptnano.cli.lightning import one_problem

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--thing", type=_Base | bool | None)
    name = f"{__name__}._Needs"

    def message(*args: str) -> str:
        with pytest.raises(ArgumentError) as raised:
            parser.parse_args(list(args))
        return str(raised.value)

    missing = message(f"--thing={name}")
    assert len(missing.splitlines()) > 5
    assert one_problem(missing) == (f"Parser key \"thing\": Problem with given class_path '{name}': the following "
                                    "arguments are required: save_dir (give --thing.save_dir VALUE after it)")
    nested = message(f"--thing={name}", "--thing.save_dir=x", "--thing.threshold=abc")
    assert "Given value: abc" in nested and one_problem(nested) == nested
    assert one_problem("unrecognized arguments: --x 2") == "unrecognized arguments: --x 2"
