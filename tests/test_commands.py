"""The `gptnano` command line as a whole: what each subcommand imports (the tools and the
top-level help start without Lightning), and what a user sees in the terminal (quiet by
default, everything with --verbose)."""

import subprocess
import sys

import pytest
import torch

from gptnano.cli.commands import LIGHTNING, TOOLS
from gptnano.cli.export import main as export
from gptnano.cli.main import wants_verbose
from tests.helpers import TINY_GPT, run_cli

# Runs the command in-process, then reports whether Lightning got imported along the way.
IMPORTS_LIGHTNING = """
import sys
from gptnano.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, f"the command failed with status {e.code}"
print("lightning imported:", any(m == "lightning" or m.startswith("lightning.") for m in sys.modules))
"""


def lightning_imported(args: list[str], cwd) -> bool:
    """Whether the command, which must succeed, imported Lightning."""
    proc = subprocess.run([sys.executable, "-c", IMPORTS_LIGHTNING, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    return line == "lightning imported: True"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.helpers import make_text

    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.txt").write_text(make_text(), encoding="utf-8")
    run_cli(["fit", *TINY_GPT, "--data.path", "tiny.txt", "--trainer.max_steps", "3",
             "--trainer.val_check_interval", "3"], folder)  # a validation, so that plot has a loss to draw
    return folder / "checkpoints" / "gpt" / "last.ckpt"


def test_tools_and_top_level_help_start_without_lightning(ckpt, tmp_path):
    assert not lightning_imported(["--help"], tmp_path)
    assert not lightning_imported(["plot", "--help"], tmp_path)
    assert not lightning_imported(["senses", "--help"], tmp_path)
    assert not lightning_imported(["compare", "--help"], tmp_path)
    assert not lightning_imported(["generate", "--ckpt_path", str(ckpt), "--max_new_tokens", "5"], tmp_path)
    assert not lightning_imported(["inspect", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "page.html")], tmp_path)
    assert not lightning_imported(["plot", str(ckpt.parents[2] / "lightning_logs" / "gpt"), "--out",
                                   str(tmp_path / "p.png")], tmp_path)
    export(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "exported")])  # (no Lightning: tests/test_layers.py)
    assert not lightning_imported(["generate", "--ckpt_path", str(tmp_path / "exported"), "--max_new_tokens", "5"],
                                  tmp_path)
    assert lightning_imported(["validate", "--help"], tmp_path)  # the check itself can fail


def test_top_level_help_lists_every_command(tmp_path):
    out = run_cli(["--help"], tmp_path).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert {*LIGHTNING, *TOOLS} <= listed and "--verbose" in out


def test_unknown_or_missing_command_is_one_line(tmp_path):
    bad = run_cli(["fitt"], tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "gptnano: error: unknown command 'fitt': choose one of fit, validate, test, predict, generate, senses, plot, "
        "compare, export, inspect"]
    none = run_cli([], tmp_path, check=False)
    assert none.returncode == 2 and none.stderr.strip().endswith("gptnano: error: choose a command")


def test_verbose_flag_and_environment(monkeypatch):
    monkeypatch.delenv("GPTNANO_VERBOSE", raising=False)
    assert wants_verbose(["fit", "--verbose", "--config", "x"]) == (True, ["fit", "--config", "x"])
    assert wants_verbose(["fit"]) == (False, ["fit"])
    monkeypatch.setenv("GPTNANO_VERBOSE", "1")
    assert wants_verbose(["fit"]) == (True, ["fit"])
    monkeypatch.setenv("GPTNANO_VERBOSE", "0")
    assert wants_verbose(["fit"]) == (False, ["fit"])


# A machine with many cores, as Lightning sees it: its "does not have many workers" warning
# only fires where there are more than 2 CPUs to suggest.
MANY_CORES = """
import os, sys
os.sched_getaffinity = lambda pid: set(range(16))
from gptnano.cli.main import main
main(sys.argv[1:])
"""


def test_quiet_by_default_everything_with_verbose(text_file, tmp_path):
    with_summary = TINY_GPT[:TINY_GPT.index("--trainer.enable_model_summary")]
    fit = ["fit", *with_summary, "--data.path", str(text_file), "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "2", "--trainer.precision", "bf16-mixed"]
    outputs = {}
    for mode in ("quiet", "verbose"):
        folder = tmp_path / mode
        folder.mkdir()
        proc = subprocess.run([sys.executable, "-c", MANY_CORES, *fit, *(["--verbose"] if mode == "verbose" else [])],
                              cwd=folder, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[mode] = proc.stdout + proc.stderr
    noise = ["💡 Tip", "does not have many workers", "TPU available: False", "not supported by the model summary",
             "already configured with model summary callbacks"]
    for line in noise:
        assert line not in outputs["quiet"], line
        assert line in outputs["verbose"], line  # still there to hide: the test sees the real messages
    for shown in (outputs["quiet"], outputs["verbose"]):
        assert "Total params" in shown and "FLOPs" not in shown and "Total Flops" not in shown
    assert "GPU available" in outputs["quiet"]  # information a user may act on stays


def test_fp32_matmul_precision_is_chosen_not_left_to_a_hint(text_file, tmp_path, monkeypatch):
    """TF32 for CUDA's fp32 products (what Lightning's tensor-core hint asks for), exact fp32 on the CPU."""
    from gptnano.cli.lightning import GPTNanoCLI

    monkeypatch.chdir(tmp_path)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        GPTNanoCLI(args=[*TINY_GPT, "--data.path", str(text_file)], run=False)
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() != "highest"  # Lightning prints its hint only on "highest"
        cpu = getattr(torch.backends.mkldnn, "matmul", None)  # this setting exists from torch 2.9 on
        assert cpu is None or cpu.fp32_precision in ("none", "ieee")  # the CPU stays exact
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
