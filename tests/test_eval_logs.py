"""validate / test / predict log with the run they scored, at its step, apart from its training
curves (issue 19, item 4); `gptnano plot` reads the training curves only."""

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import TINY_GPT, fit_in_process, make_text


def _val_steps(version: Path) -> dict[int, float]:
    acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("val/loss")} if "val/loss" in acc.Tags()["scalars"] else {}


@pytest.fixture(scope="module")
def run_lr(tmp_path_factory):
    """A run named lr: 10 steps, validated at 5 and 10."""
    return fit_in_process(tmp_path_factory.mktemp("evals"), make_text(),
                          [*TINY_GPT, "--run_name", "lr", "--trainer.max_steps", "10", "--trainer.val_check_interval", "5"])


def test_validate_logs_with_the_checkpoint_s_run_at_its_step(run_lr, gptnano, tmp_path):
    """`validate --ckpt_path checkpoints/lr/last.ckpt`, no --run_name, run from another folder: before,
    its loss went to lightning_logs/gpt/ at step 0 and `plot lightning_logs/gpt` called it that run's best."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    ran = gptnano(["validate", "--ckpt_path", str(run_lr / "checkpoints" / "lr" / "last.ckpt"),
                   "--data.path", str(run_lr / "tiny.txt")], work)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert not (work / "lightning_logs" / "gpt").exists()
    logged = _val_steps(work / "lightning_logs" / "lr" / "eval" / "version_0")
    assert list(logged) == [10]


def test_evaluations_stay_apart_from_the_training_curves(run_lr, gptnano, capsys):
    """`validate --run_name lr --ckpt_path best` and `predict` in the run's own folder: their logs
    go to lightning_logs/lr/eval/ at the checkpoint's step, and `plot` still reports the training."""
    train_logs = run_lr / "lightning_logs" / "lr"
    trained = _val_steps(train_logs / "version_0")
    ran = gptnano(["validate", "--run_name", "lr", "--ckpt_path", "best", "--data.path", "tiny.txt"], run_lr)
    assert ran.returncode == 0, ran.stderr[-2000:]
    evals = sorted((train_logs / "eval").glob("version_*"))
    best_step = min(trained, key=trained.get)
    assert [list(_val_steps(v)) for v in evals] == [[best_step]]
    assert sorted(p.name for p in train_logs.glob("version_*")) == ["version_0"]  # no new training version
    ran = gptnano(["predict", "--run_name", "lr", "--ckpt_path", "last", "--data.prompt", "ROMEO:",
                   "--model.max_new_tokens", "5"], run_lr)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert list((train_logs / "eval").glob("version_*/predictions.txt"))
    ran = gptnano(["plot", "lightning_logs/lr", "--out", "lr.png"], run_lr)
    assert ran.returncode == 0, ran.stderr[-2000:]
    row = next(line for line in ran.stdout.splitlines() if line.startswith("| lr"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[2] == f"{min(trained.values()):.4f}" and cells[4] == "10"
