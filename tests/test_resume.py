"""Resuming a run (issue 19): what is typed on a resume is what trains, a run folder moved to
another place goes on as the same run, and every fit ends with one line saying why.

Each scenario runs the `gptnano` command in this process (tests/conftest.py's ``gptnano``)."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptnano.train.checkpointing import rebased
from tests.helpers import TINY_GPT, fit_in_process, make_text

FIT = ["fit", *TINY_GPT, "--model.optimizer", "adamw", "--trainer.log_every_n_steps", "1"]


def _ckpt(folder: Path, name: str = "last.ckpt") -> dict:
    return torch.load(folder / name, weights_only=True)


def _scalars(run_logs: Path, tag: str) -> dict[int, float]:
    """``tag``'s values by step over every training version of a run."""
    values = {}
    for version in sorted(run_logs.glob("version_*")):
        acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def _ok(ran):
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran


def _end_line(ran) -> str:
    return next(line for line in ran.stderr.splitlines() if line.startswith("gptnano: fit ended at"))


# ----- 1. settings typed on a resume are the ones that train -------------------------------
def test_a_learning_rate_typed_on_resume_trains(gptnano, text_file, tmp_path):
    """Issue 19, item 1: lr 1e-3 for 5 steps, then resumed with 1e-4: TensorBoard's lr (read from
    the optimizer) is 1e-4 for steps 5-9, and so are the optimizer's saved groups; weight decay and
    beta1 typed on the resume reach the optimizer too. (Before: 1e-3 went on; hparams.yaml said 1e-4.)"""
    run = [*FIT, "--data.path", str(text_file), "--run_name", "lr2", "--trainer.val_check_interval", "100"]
    _ok(gptnano([*run, "--model.learning_rate", "1e-3", "--model.min_lr", "1e-3", "--model.warmup_steps", "0",
                 "--trainer.max_steps", "5"], tmp_path))
    _ok(gptnano([*run, "--ckpt_path", "last", "--model.learning_rate", "1e-4", "--model.min_lr", "1e-4",
                 "--model.weight_decay", "0.5", "--model.beta1", "0.5", "--trainer.max_steps", "10"], tmp_path))
    lr = _scalars(tmp_path / "lightning_logs" / "lr2", "lr/AdamW/adamw")
    assert [lr[s] for s in range(5)] == pytest.approx([1e-3] * 5)
    assert [lr[s] for s in range(5, 10)] == pytest.approx([1e-4] * 5)
    decay, no_decay = _ckpt(tmp_path / "checkpoints" / "lr2")["optimizer_states"][0]["param_groups"]
    assert decay["lr"] == pytest.approx(1e-4) and decay["weight_decay"] == 0.5 and tuple(decay["betas"]) == (0.5, 0.99)
    assert no_decay["weight_decay"] == 0.0 and tuple(no_decay["betas"]) == (0.5, 0.99)
    recorded = yaml.safe_load((tmp_path / "lightning_logs" / "lr2" / "version_1" / "hparams.yaml").read_text())
    assert recorded["learning_rate"] == 1e-4 and recorded["weight_decay"] == 0.5


def test_muon_settings_typed_on_resume_follow_the_new_schedule(gptnano, text_file, tmp_path):
    """The same kind with Muon: a new muon_lr, min_lr and momentum on a resume. The rate at the
    resumed step is the new schedule's there (peak x cosine), not the old peak scaled."""
    run = ["fit", *TINY_GPT, "--model.optimizer", "muon", "--data.path", str(text_file), "--trainer.val_check_interval",
           "100", "--model.warmup_steps", "0", "--model.lr_decay_steps", "20"]
    _ok(gptnano([*run, "--trainer.max_steps", "4"], tmp_path))
    _ok(gptnano([*run, "--ckpt_path", "last", "--model.muon_lr", "0.05", "--model.learning_rate", "2e-3",
                 "--model.min_lr", "2e-3", "--model.muon_momentum", "0.8", "--trainer.max_steps", "6"], tmp_path))
    groups = {g["name"]: g for g in _ckpt(tmp_path / "checkpoints" / "gpt")["optimizer_states"][0]["param_groups"]}
    assert groups["muon"]["lr"] == pytest.approx(0.05) and groups["muon"]["momentum"] == 0.8  # min_lr = lr: flat
    assert groups["adamw"]["lr"] == pytest.approx(2e-3)
    assert _ckpt(tmp_path / "checkpoints" / "gpt")["lr_schedulers"][0]["base_lrs"] == pytest.approx([2e-3, 2e-3, 0.05])


def test_a_schedule_and_momentum_warmup_typed_on_resume_act_as_if_from_the_start(gptnano, text_file, tmp_path):
    """A run trained 4 steps with the cosine and a constant momentum, resumed with the trapezoid and a
    10-step momentum warmup: step 6 trains with what those give at step 6 (the peak rate, which
    the trapezoid holds until step 10 of 20, and momentum 0.85 + 0.6 x 0.1), not the saved values."""
    run = ["fit", *TINY_GPT, "--model.optimizer", "muon", "--data.path", str(text_file), "--trainer.val_check_interval",
           "100", "--model.warmup_steps", "0", "--model.lr_decay_steps", "20"]
    _ok(gptnano([*run, "--trainer.max_steps", "4"], tmp_path))
    _ok(gptnano([*run, "--ckpt_path", "last", "--model.lr_schedule", "wsd", "--model.cooldown_fraction", "0.5",
                 "--model.muon_momentum_warmup_steps", "10", "--trainer.max_steps", "6"], tmp_path))
    groups = {g["name"]: g for g in _ckpt(tmp_path / "checkpoints" / "gpt")["optimizer_states"][0]["param_groups"]}
    assert groups["muon"]["lr"] == pytest.approx(0.02) and groups["muon"]["momentum"] == pytest.approx(0.91)


def test_early_stopping_ends_with_its_reason_and_a_typed_patience_wins_on_resume(gptnano, text_file, tmp_path):
    """Items 1 and 3: patience 1 with a min_delta no validation can beat stops at step 10 of 30 and
    says so in one line (before: exit 0 and no word); resumed with patience 100 it trains on (before:
    the saved patience 1 stopped it at once)."""
    run = [*FIT, "--data.path", str(text_file), "--run_name", "es", "--trainer.val_check_interval", "5",
           "--trainer.max_steps", "30"]
    ran = _ok(gptnano([*run, "--early_stopping.patience", "1", "--early_stopping.min_delta", "10"], tmp_path))
    line = _end_line(ran)
    assert line.startswith("gptnano: fit ended at step 10/30: early stopping: val/loss did not improve by more than "
                           "10 in 1 validation (patience 1)"), line
    assert "checkpoints in checkpoints/es" in line and "Trainer.fit` stopped" not in ran.stderr
    resumed = _ok(gptnano([*run, "--ckpt_path", "last", "--early_stopping.patience", "100"], tmp_path))
    assert _ckpt(tmp_path / "checkpoints" / "es")["global_step"] == 30
    assert _end_line(resumed).startswith("gptnano: fit ended at step 30/30: max_steps reached | best val/loss ")


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """A finished tiny AdamW run (10 steps, validation every 5) to resume from."""
    return fit_in_process(tmp_path_factory.mktemp("adamw"), make_text(),
                          [*FIT[1:], "--trainer.max_steps", "10", "--trainer.val_check_interval", "5"])


@pytest.mark.parametrize("typed,error", [
    (["--checkpoint.monitor", "val/bpc"], r"--checkpoint\.monitor val/bpc cannot change on resume \(the run's is "
                                          r"val/loss\): best\.ckpt and its score are kept by this metric"),
    (["--early_stopping.mode", "max"], r"--early_stopping\.mode max cannot change on resume"),
    (["--model.optimizer", "muon"], r"--model\.optimizer muon cannot change on resume \(the run's is adamw\): "
                                    r"the saved optimizer state is the other optimizer's"),
    (["--data.val_fraction", "0.2"], r"--data\.val_fraction 0\.2 cannot change on resume"),
])
def test_settings_a_resume_cannot_take_are_refused_in_one_line(typed, error, adamw_run, gptnano):
    """Before: the monitor changed silently (Lightning keys best.ckpt's state by it, so best-model
    tracking restarted), and Muon over AdamW's saved state failed deep inside Lightning."""
    import re

    before = (adamw_run / "checkpoints" / "gpt" / "last.ckpt").read_bytes()
    ran = gptnano([*FIT, "--data.path", "tiny.txt", "--trainer.max_steps", "12", "--ckpt_path", "last", *typed],
                  adamw_run)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    last = ran.stderr.strip().splitlines()[-1]
    assert last.startswith("gptnano: error: ") and re.search(error, last), last
    assert (adamw_run / "checkpoints" / "gpt" / "last.ckpt").read_bytes() == before


# ----- 2. a run folder moved or copied elsewhere goes on as the same run -------------------
def test_a_run_copied_to_another_place_resumes_as_itself(gptnano, adamw_run, tmp_path):
    """Issue 19, item 2: checkpoints/<run> and lightning_logs/<run> copied to another folder (another
    machine): two resumes there overwrite last.ckpt in place (before: last-v1.ckpt, then a restart
    from the stale step 10), best-model tracking goes on, and `gptnano plot` reads the whole run."""
    for part in ("checkpoints", "lightning_logs"):
        shutil.copytree(adamw_run / part / "gpt", tmp_path / part / "gpt")
    shutil.copy(adamw_run / "tiny.txt", tmp_path / "tiny.txt")
    best_before = _ckpt(tmp_path / "checkpoints" / "gpt")["callbacks"]
    for steps in ("15", "20"):
        ran = _ok(gptnano([*FIT, "--data.path", "tiny.txt", "--trainer.val_check_interval", "5",
                           "--trainer.max_steps", steps, "--ckpt_path", "last"], tmp_path))
        assert "exists and is not empty" not in ran.stderr  # item 9: a correct resume is quiet
    folder = tmp_path / "checkpoints" / "gpt"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    ckpt = _ckpt(folder)
    assert ckpt["global_step"] == 20
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("Checkpoint"))
    old = next(v for k, v in best_before.items() if k.startswith("Checkpoint"))
    assert Path(state["dirpath"]) == folder.resolve() and Path(state["best_model_path"]) == folder.resolve() / "best.ckpt"
    assert float(state["best_model_score"]) <= float(old["best_model_score"])  # tracked across the move
    assert float(_ckpt(folder, "best.ckpt")["callbacks"][next(iter(k for k in ckpt["callbacks"] if k.startswith(
        "Checkpoint")))]["best_model_score"]) == float(state["best_model_score"])
    assert sorted(_scalars(tmp_path / "lightning_logs" / "gpt", "val/loss")) == [5, 10, 15, 20]


def test_a_fresh_run_into_a_folder_with_any_checkpoint_is_refused(gptnano, text_file, tmp_path):
    """Only best.ckpt left (last.ckpt deleted): a fresh fit would have written best-v1.ckpt beside it."""
    folder = tmp_path / "checkpoints" / "gpt"
    folder.mkdir(parents=True)
    (folder / "best.ckpt").write_bytes(b"kept")
    ran = gptnano([*FIT, "--data.path", str(text_file), "--trainer.max_steps", "2"], tmp_path)
    assert ran.returncode == 2 and "checkpoints/gpt already holds a run" in ran.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt"]


def test_saved_paths_follow_the_folder_they_were_saved_in():
    posix = {"dirpath": "/old/checkpoints/run", "best_model_path": "/old/checkpoints/run/best.ckpt",
             "last_model_path": "/old/checkpoints/run/last.ckpt", "kth_best_model_path": "/elsewhere/best.ckpt",
             "best_k_models": {"/old/checkpoints/run/best.ckpt": 1.5}}
    moved = rebased(posix, "/new/run")
    assert moved["dirpath"] == "/new/run" and moved["best_model_path"] == "/new/run/best.ckpt"
    assert moved["last_model_path"] == "/new/run/last.ckpt" and moved["best_k_models"] == {"/new/run/best.ckpt": 1.5}
    assert moved["kth_best_model_path"] == "/elsewhere/best.ckpt"  # not the run's: left as it was
    windows = rebased({"dirpath": "C:\\runs\\run", "last_model_path": "C:\\runs\\run\\last.ckpt"}, "/new/run")
    assert windows["last_model_path"] == "/new/run/last.ckpt"
