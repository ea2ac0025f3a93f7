"""Trust in checkpoints: loading one never runs code, every reader goes through the one
safe path, and a run's own checkpoint is enough to resume, validate, test and predict
it, whatever sizes its first command typed."""

import re
from pathlib import Path

import pytest
import torch

from gptnano.checkpoint import load_net, read_checkpoint
from gptnano.errors import UserError
from gptnano.train.checkpointing import AtomicCheckpointIO
from tests.helpers import TINY_GPT, make_text, run_cli

ROOT = Path(__file__).resolve().parents[1]
GPT_YAML = str(ROOT / "configs" / "gpt.yaml")
# The sizes of this run come from the command line, not from configs/gpt.yaml (4 x 128, context 64).
SIZES = ["--model.net.n_layer", "2", "--model.net.n_embd", "32", "--model.net.n_head", "2",
         "--model.net.init_args.block_size", "16"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of configs/gpt.yaml whose sizes were typed on the command line."""
    work = tmp_path_factory.mktemp("run")
    text = work / "tiny.txt"
    text.write_text(make_text(), encoding="utf-8")
    data = ["--data.path", str(text), "--data.test_fraction", "0.1", "--data.batch_size", "4"]
    run_cli(["fit", "--config", GPT_YAML, *SIZES, *data, *QUIET, "--trainer.max_steps", "6",
             "--trainer.val_check_interval", "3"], work)
    return work, data


def _error_line(proc) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gptnano: error: "), proc.stderr[-2000:]
    return last


def test_every_subcommand_takes_the_network_from_the_checkpoint(run, gptnano):
    work, data = run
    resumed = run_cli(["fit", "--config", GPT_YAML, *data, *QUIET, "--ckpt_path", "last", "--trainer.max_steps", "9",
                       "--trainer.val_check_interval", "3"], work)
    assert "Restored all states" in resumed.stdout + resumed.stderr
    last = read_checkpoint(work / "checkpoints" / "gpt" / "last.ckpt")
    assert last["global_step"] == 9
    assert last["hyper_parameters"]["net"]["init_args"]["n_layer"] == 2  # the checkpoint's, not the config's 4

    # validate, test and predict in this process (the same command, without Lightning's start-up again)
    val = gptnano(["validate", "--config", GPT_YAML, *data, "--ckpt_path", "last"], work)
    assert re.search(r"val/loss\W+[0-9.]+", val.stdout)
    test = gptnano(["test", "--config", GPT_YAML, *data, "--ckpt_path", "best"], work)
    assert re.search(r"test/loss\W+[0-9.]+", test.stdout)
    out = gptnano(["predict", "--config", GPT_YAML, *data, "--ckpt_path", "last", "--data.prompt", "KING",
                   "--model.max_new_tokens", "25"], work)
    assert out.stdout.startswith("KING") and len(out.stdout.rstrip("\n")) == len("KING") + 25


def test_a_size_the_saved_weights_cannot_take_is_one_line(run):
    work, data = run
    proc = run_cli(["validate", "--config", GPT_YAML, *data, "--ckpt_path", "last", "--model.net.n_layer", "3"],
                   work, check=False)
    assert "n_layer=3 (saved: 2)" in _error_line(proc)


def test_a_setting_the_weights_still_fit_may_change(run):
    work, data = run
    # Dropout changes no weight: evaluating the run with it set is allowed (eval mode ignores it).
    run_cli(["validate", "--config", GPT_YAML, *data, "--ckpt_path", "last", "--model.net.dropout", "0.1"], work)


def test_a_checkpoint_of_another_architecture_is_one_line(run):
    work, data = run
    proc = run_cli(["validate", "--config", str(ROOT / "configs" / "rnn.yaml"), *data,
                    "--ckpt_path", str(work / "checkpoints" / "gpt" / "last.ckpt")], work, check=False)
    assert "holds a GPT network, but --config or --model.net ask for RNN" in _error_line(proc)


# ----- crafted files: nothing they name may run ---------------------------------
def _crafted(path: Path, net, **extra) -> str:
    torch.save({"state_dict": {}, "hyper_parameters": {"net": net, "vocab": "abc", **extra}}, path)
    return str(path)


def _touch(marker: Path) -> dict:
    return {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}


@pytest.mark.parametrize("command", [
    ["senses", "--token", "a"],
    ["generate"],
    ["predict"],
    ["validate"],
    ["fit", *TINY_GPT],
])
@pytest.mark.parametrize("shape", ["callable", "nested", "foreign-module"])
def test_a_crafted_checkpoint_runs_nothing(command, shape, tmp_path, gptnano, monkeypatch):
    marker = tmp_path / "pwned"
    if shape == "callable":  # a callable instead of a network
        net = _touch(marker)
    elif shape == "nested":  # a known network, with a callable hidden in its arguments
        net = {"class_path": "gptnano.models.GPT", "init_args": {"n_layer": _touch(marker)}}
    else:  # a module that would run code when imported
        (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: pass\n")
        net = {"class_path": "evil.Model", "init_args": {}}
    ckpt = _crafted(tmp_path / "evil.ckpt", net)
    monkeypatch.syspath_prepend(str(tmp_path))  # evil.py could be imported, if anything tried
    proc = gptnano([*command, "--ckpt_path", ckpt], tmp_path)
    assert re.search(r"refusing to load it", _error_line(proc))
    assert not marker.exists()


def test_a_torch_file_without_hyper_parameters_is_refused(tmp_path, gptnano):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"net.wte.weight": torch.zeros(3, 4)}}, path)
    with pytest.raises(UserError, match="not a gptnano checkpoint"):
        load_net(path)
    proc = gptnano(["predict", "--ckpt_path", str(path)], tmp_path)
    assert "not a gptnano checkpoint" in _error_line(proc)


def test_a_checkpoint_that_is_a_folder_is_one_line(tmp_path, gptnano):
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    for command in (["predict"], ["senses", "--token", "a"]):
        proc = gptnano([*command, "--ckpt_path", str(folder)], tmp_path)
        assert "checkpoint is a folder" in _error_line(proc)


def test_weights_that_do_not_fit_their_network_are_one_line(run, tmp_path):
    work, _ = run
    ckpt = torch.load(work / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["net"]["init_args"]["n_embd"] = 64  # weights are 32 wide
    torch.save(ckpt, tmp_path / "bent.ckpt")
    with pytest.raises(UserError, match="do not fit a GPT"):
        load_net(tmp_path / "bent.ckpt")


def test_resuming_a_checkpoint_from_elsewhere_never_overwrites_this_folders_run(run, tmp_path, gptnano):
    work, data = run
    elsewhere = tmp_path / "downloaded.ckpt"
    elsewhere.write_bytes((work / "checkpoints" / "gpt" / "last.ckpt").read_bytes())
    before = (work / "checkpoints" / "gpt" / "last.ckpt").read_bytes()
    proc = gptnano(["fit", "--config", GPT_YAML, *data, "--ckpt_path", str(elsewhere), "--trainer.max_steps", "12"], work)
    assert "checkpoints/gpt already holds a run" in _error_line(proc)
    assert (work / "checkpoints" / "gpt" / "last.ckpt").read_bytes() == before


def test_a_non_finite_weight_is_refused_by_every_reader(run, tmp_path, gptnano):
    """Lightning's own resume reads through AtomicCheckpointIO: it refuses the file too, by name."""
    work, data = run
    ckpt = torch.load(work / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)
    ckpt["state_dict"]["net.blocks.1.mlp.c_proj.bias"][3] = float("-inf")
    torch.save(ckpt, tmp_path / "diverged.ckpt")
    for read in (read_checkpoint, load_net, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(UserError, match=r"non-finite weights \(NaN or infinity\) in net\.blocks\.1\.mlp\.c_proj\.bias"):
            read(tmp_path / "diverged.ckpt")
    resumed = gptnano(["fit", "--config", GPT_YAML, *data, "--ckpt_path", str(tmp_path / "diverged.ckpt"),
                       "--run_name", "again"], tmp_path)
    assert "non-finite weights" in _error_line(resumed)
