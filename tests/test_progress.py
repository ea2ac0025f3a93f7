"""Progress in a log file: plain lines instead of a carriage-return bar (gptnano/train/progress.py),
chosen by whether the bar's stream is a terminal."""

import io
import sys
from types import SimpleNamespace

import pytest
import torch

from gptnano import lines
from gptnano.train.progress import LogLines, is_terminal
from tests.helpers import TINY_GPT, run_cli


def _trainer(step=0, **kw):
    settings = dict(global_step=step, max_steps=100, log_every_n_steps=10, accumulate_grad_batches=2, world_size=1,
                    is_global_zero=True, sanity_checking=False, state=SimpleNamespace(fn="fit"), callback_metrics={},
                    checkpoint_callbacks=[], fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                        batch_progress=SimpleNamespace(is_last_batch=False))))
    return SimpleNamespace(**{**settings, **kw})


def _best(score: float):
    """gptnano's checkpoint callback holding a best score (the progress line reads that one)."""
    from gptnano.train.checkpointing import Checkpoint

    callback = Checkpoint(monitor="val/loss")
    callback.best_model_score = torch.tensor(score)
    return callback


def test_a_line_per_logging_step_with_the_update_s_mean_loss():
    out = io.StringIO()
    bar, trainer = LogLines(file=out), _trainer()
    bar.on_train_start(trainer, None)
    batch = (torch.zeros(4, 8, dtype=torch.long), None)  # 32 tokens a micro-batch
    for step in range(1, 21):
        for micro, loss in enumerate([1.0, 3.0]):  # Lightning hands over each loss / accumulate_grad_batches
            trainer.global_step = step - 1 + micro  # the update lands at the second micro-batch
            bar.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss / 2)}, batch, 2 * (step - 1) + micro)
    printed = out.getvalue().splitlines()
    assert [p.split(" | ")[:2] for p in printed] == [["gptnano: step 10/100", "loss 2.0000"],
                                                     ["gptnano: step 20/100", "loss 2.0000"]]
    assert printed[1].split(" | ")[2].endswith(" tok/s") and printed[1].split(" | ")[3].startswith("ETA ")


def test_only_rank_zero_writes_and_a_disabled_bar_is_silent():
    out = io.StringIO()
    bar = LogLines(file=out)
    batch = (torch.zeros(1, 1, dtype=torch.long), None)
    bar.on_train_start(_trainer(), None)
    bar.on_train_batch_end(_trainer(step=10, is_global_zero=False), None, {"loss": torch.tensor(1.0)}, batch, 1)
    bar.disable()
    bar.on_train_batch_end(_trainer(step=20), None, {"loss": torch.tensor(1.0)}, batch, 1)
    assert out.getvalue() == "" and not bar.is_enabled


def test_a_validation_line_with_the_best_loss_so_far():
    out = io.StringIO()
    bar = LogLines(file=out)
    trainer = _trainer(step=250, callback_metrics={"val/loss": torch.tensor(1.9), "val/bpc": torch.tensor(2.741)},
                       checkpoint_callbacks=[_best(1.8)])
    bar.on_validation_start(trainer, None)
    bar.on_validation_end(trainer, None)
    assert out.getvalue().startswith("gptnano: step 250/100 | val/loss 1.9000 | val/bpc 2.741 | best 1.8000 | validation ")
    trainer.sanity_checking = True  # Lightning's sanity pass before training: no line
    bar.on_validation_end(trainer, None)
    assert len(out.getvalue().splitlines()) == 1


def test_no_line_is_longer_than_the_width():
    assert len(lines.line("step 1/2", "x" * 300)) == lines.MAX_WIDTH


@pytest.mark.parametrize("terminal", [True, False])
def test_a_terminal_keeps_the_bar_a_file_gets_lines(terminal, text_file, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ProgressBar

    from gptnano.cli.lightning import GPTNanoCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal, raising=False)
    assert is_terminal(sys.stdout) is terminal
    cli = GPTNanoCLI(args=[*TINY_GPT, "--data.path", str(text_file), "--trainer.enable_progress_bar", "true"],
                     run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, ProgressBar) and isinstance(bar, LogLines) is not terminal
    assert [type(c) for c in cli.trainer.callbacks].count(type(bar)) == 1


def test_fit_into_a_file_writes_short_plain_lines(text_file, tmp_path):
    """`gptnano fit ... > run.log`: no carriage return anywhere, a line per 5 steps and per
    validation, and no line longer than 200 characters."""
    ran = run_cli(["fit", *TINY_GPT, "--data.path", str(text_file), "--trainer.enable_progress_bar", "true",
                   "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
                   "--trainer.log_every_n_steps", "5"], tmp_path)
    assert "\r" not in ran.stdout + ran.stderr
    steps = [line.split(" | ")[:2] for line in ran.stdout.splitlines() if line.startswith("gptnano: step")]
    assert [(s.split()[-1], f.split()[0]) for s, f in steps] == [
        ("5/20", "loss"), ("10/20", "loss"), ("10/20", "val/loss"), ("15/20", "loss"), ("20/20", "loss"),
        ("20/20", "val/loss")]
    assert max(len(line) for line in (ran.stdout + ran.stderr).splitlines()) <= 200


@pytest.mark.parametrize("terminal", [True, False])
def test_the_bar_and_summary_stay_plain_when_rich_is_installed(terminal, text_file, tmp_path, monkeypatch):
    """Lightning swaps in RichProgressBar and RichModelSummary whenever `rich` is importable (many
    tools install it); gptnano keeps its own output. Rich is made to look installed here: were the
    Trainer left to choose, it would build the Rich callbacks (and fail without the package)."""
    from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
    from lightning.pytorch.trainer.connectors import callback_connector

    from gptnano.cli.lightning import GPTNanoCLI

    monkeypatch.setattr(callback_connector, "_RICH_AVAILABLE", True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal, raising=False)
    cli = GPTNanoCLI(args=[*TINY_GPT, "--data.path", str(text_file), "--trainer.enable_progress_bar", "true",
                           "--trainer.enable_model_summary", "true"], run=False)
    kinds = {type(c).__name__ for c in cli.trainer.callbacks}
    assert not {k for k in kinds if k.startswith("Rich")}, kinds
    assert type(cli.trainer.progress_bar_callback) is (TQDMProgressBar if terminal else LogLines)
    assert sum(isinstance(c, ModelSummary) for c in cli.trainer.callbacks) == 1
