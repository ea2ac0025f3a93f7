"""The `gptnano` command, driven as a user drives it: fit -> resume -> validate -> predict."""

import glob
from pathlib import Path

import pytest
import torch

from gptnano.cli.lightning import GPTNanoCLI
from tests.helpers import TINY_GPT, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/**/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_builds(config, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = GPTNanoCLI(args=["--config", str(ROOT / config), "--data.path", str(text_file)], run=False)
    assert cli.model.net.vocab_size == cli.datamodule.vocab_size == len(set(text_file.read_text()))
    assert cli.model.tokenizer.vocab == cli.datamodule.vocab
    assert cli.trainer.max_steps > 0


def test_round_trip_fit_resume_validate_predict(text_file, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    data = ["--data.path", str(text_file)]
    fit = ["fit", *TINY_GPT, *data, "--trainer.val_check_interval", "10", "--checkpoint.last_every_n_steps", "5"]
    run_cli([*fit, "--trainer.max_steps", "10"], work)
    last = work / "checkpoints" / "gpt" / "last.ckpt"
    assert last.is_file() and (work / "checkpoints" / "gpt" / "best.ckpt").is_file()
    assert glob.glob(str(work / "lightning_logs" / "gpt" / "version_0" / "events.out.tfevents.*"))
    assert torch.load(last, weights_only=True)["global_step"] == 10

    # A second fit of the same run refuses to overwrite it ...
    again = run_cli([*fit, "--trainer.max_steps", "10"], work, check=False)
    assert again.returncode != 0 and "--ckpt_path last" in again.stderr
    # ... and --ckpt_path last continues in a new process from step 10.
    resumed = run_cli([*fit, "--trainer.max_steps", "20", "--ckpt_path", "last"], work)
    assert "Restored all states" in resumed.stderr + resumed.stdout
    assert torch.load(last, weights_only=True)["global_step"] == 20

    # gptnano plot reads the run's TensorBoard logs (both versions: the run and its resume).
    plotted = run_cli(["plot", "lightning_logs/gpt", "--out", "curves.png"], work)
    assert (work / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = next(line for line in plotted.stdout.splitlines() if line.startswith("| gpt"))
    assert row.split("|")[4].strip() == "20"  # the last validation's optimizer step, read across both versions

    val = run_cli(["validate", *TINY_GPT, *data, "--ckpt_path", "best"], work)
    assert "val/loss" in val.stdout and "val/bpc" in val.stdout

    # predict from the checkpoint alone: a folder with no text, no config, no network.
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    out = run_cli(["predict", "--ckpt_path", str(last), "--data.prompt", "ROMEO:", "--model.max_new_tokens", "40",
                   "--trainer.enable_progress_bar", "false"], empty)
    sample = out.stdout.strip()
    assert sample.startswith("ROMEO:") and len(sample) >= len("ROMEO:") + 30
    written = list(empty.glob("lightning_logs/gpt/eval/version_*/predictions.txt"))
    assert written and written[0].read_text().strip() == sample
    assert not (empty / "data").exists()  # nothing was downloaded


def test_print_config_shows_linked_model_and_defaults(text_file, tmp_path):
    out = run_cli(["fit", "--config", str(ROOT / "configs" / "gpt.yaml"), "--data.path", str(text_file),
                   "--print_config"], tmp_path)
    assert "class_path: gptnano.models.GPT" in out.stdout
    assert "save_last: true" in out.stdout and "monitor: val/loss" in out.stdout


def test_help_shows_docstrings(tmp_path):
    out = run_cli(["fit", "--help"], tmp_path)
    assert "Peak learning rate" in out.stdout and "GPTNANO_DATA" in out.stdout


def test_compiled_training_matches_eager_and_keeps_plain_checkpoints(text_file, tmp_path):
    """--model.compile true trains through torch.compile (hand-written attention inside)
    to the same losses as eager, up to float rounding, and writes the same checkpoint keys. What
    it compiles is kept in gptnano's per-user cache folder (here GPTNANO_CACHE_DIR), which a
    reboot keeps, and two lines say when the compiling step starts and ends."""
    from tests.test_reliability import _train_losses

    losses, keys, err = {}, {}, {}
    user_cache = tmp_path / "user-cache"
    for mode in ("false", "true"):
        folder = tmp_path / mode
        folder.mkdir()
        err[mode] = run_cli(["fit", *TINY_GPT, "--data.path", str(text_file), "--model.compile", mode,
                             "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                             "--trainer.val_check_interval", "4"], folder,
                            env_extra={"GPTNANO_CACHE_DIR": str(user_cache), "TORCHINDUCTOR_CACHE_DIR": None}).stderr
        losses[mode] = _train_losses(folder)
        keys[mode] = set(torch.load(folder / "checkpoints" / "gpt" / "last.ckpt", weights_only=True)["state_dict"])
    assert keys["true"] == keys["false"]
    assert sorted(losses["true"]) == sorted(losses["false"]) == [0, 1, 2, 3]
    for step, eager in losses["false"].items():
        assert abs(losses["true"][step] - eager) < 1e-4, (step, losses)
    compiled_cache = user_cache / "torch-compile"
    assert "gptnano: torch.compile: compiling at the first step | tens of seconds the first time" in err["true"]
    assert "torch.compile: first step done in " in err["true"] and f" | cache {compiled_cache}\n" in err["true"]
    assert "torch.compile" not in err["false"]
    assert any(p.is_file() for p in compiled_cache.rglob("*"))  # what the run compiled, kept for the next


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny GPT trained from a text given by GPTNANO_DATA (no --data.path), under its own --run_name."""
    from tests.helpers import make_text

    work = tmp_path_factory.mktemp("tiny")
    text = work / "corpus.txt"
    text.write_text(make_text(), encoding="utf-8")
    run_cli(["fit", *TINY_GPT, "--run_name", "mine", "--trainer.max_steps", "30", "--trainer.val_check_interval", "30"],
            work, env_extra={"GPTNANO_DATA": str(text)})
    return work, text


def test_gptnano_data_and_run_name(tiny_run):
    work, text = tiny_run
    ckpt = torch.load(work / "checkpoints" / "mine" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["vocab"] == "".join(sorted(set(text.read_text())))  # trained on that file
    assert list((work / "lightning_logs" / "mine").glob("version_0/events.out.tfevents.*"))
    assert not (work / "checkpoints" / "gpt").exists()
    assert not (work / "data" / "tinyshakespeare").exists()  # nothing downloaded


def _predict(gptnano, work, *args) -> str:
    """`gptnano predict` in this process (tests of sampling flags: no need to pay Lightning's start-up each time)."""
    out = gptnano(["predict", "--ckpt_path", str(work / "checkpoints" / "mine" / "last.ckpt"), *args], work)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.rstrip("\n")


def test_prompt_file(tiny_run, tmp_path, gptnano):
    work, _ = tiny_run
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING HENRY:\nGood my lord", encoding="utf-8")
    sample = _predict(gptnano, work, "--data.prompt_file", str(prompt), "--model.max_new_tokens", "12")
    assert sample.startswith("KING HENRY:\nGood my lord") and len(sample) == len(prompt.read_text()) + 12


def test_sampling_flags_reach_predict(tiny_run, gptnano):
    work, _ = tiny_run
    n = ["--data.prompt", "ROMEO:", "--model.max_new_tokens", "60"]
    greedy = _predict(gptnano, work, *n, "--model.temperature", "0")
    # top-k 1 and a vanishing top-p leave only the most likely character: greedy, whatever the seed
    assert _predict(gptnano, work, *n, "--model.temperature", "1.5", "--model.top_k", "1", "--model.sample_seed", "3") == greedy
    assert _predict(gptnano, work, *n, "--model.temperature", "1.5", "--model.top_p", "1e-6", "--model.sample_seed", "4") == greedy
    hot = [_predict(gptnano, work, *n, "--model.temperature", "1.5", "--model.sample_seed", s) for s in ("1", "1", "2")]
    assert hot[0] == hot[1] != hot[2] and hot[0] != greedy  # a seed repeats a sample; another seed changes it
