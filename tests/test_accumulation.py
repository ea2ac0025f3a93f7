"""A step is an optimizer step everywhere, under any ``accumulate_grad_batches``: validation,
logging (TensorBoard and the progress lines of a log file), ``last.ckpt`` refreshes and early
stopping all count updates, not batches."""

import re

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import TINY_GPT


class Record(L.Callback):
    """The optimizer step of every validation and every checkpoint save."""

    def __init__(self):
        self.validated, self.saved = [], []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved.append(trainer.global_step)


@pytest.mark.parametrize("accumulate", [2, 3])
def test_every_interval_counts_optimizer_steps(accumulate, text_file, tmp_path, monkeypatch, capsys):
    from gptnano.cli.lightning import GPTNanoCLI

    monkeypatch.chdir(tmp_path)
    cli = GPTNanoCLI(args=[
        *TINY_GPT, "--data.path", str(text_file), "--trainer.max_steps", "12",
        "--trainer.accumulate_grad_batches", str(accumulate), "--trainer.val_check_interval", "3",
        "--trainer.log_every_n_steps", "2", "--checkpoint.last_every_n_steps", "2",
        # Every validation after the first fails to improve by 100: early stopping ends the run at the second.
        "--early_stopping.patience", "1", "--early_stopping.min_delta", "100",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "true"], run=False)
    record = Record()
    cli.trainer.callbacks.insert(0, record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert record.validated == [3, 6]  # not 1, 3 (batches 3 and 6 of 2) or 1, 2 (of 3)
    assert cli.trainer.global_step == 6  # early stopping ended the run at an update, after two validations
    assert cli.trainer.fit_loop.epoch_loop.total_batch_idx + 1 == 6 * accumulate  # no half-accumulated step
    # last.ckpt every 2 updates between validations; best and last at each validation (3, 6).
    assert sorted(set(record.saved)) == [2, 3, 4, 6]
    events = EventAccumulator(str(next(tmp_path.glob("lightning_logs/gpt/version_*"))))
    events.Reload()
    logged = [e.step for e in events.Scalars("train/loss")]
    assert logged == [1, 3, 5]  # every 2nd update (train/loss at step s: the loss update s + 1 descends)
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6]

    # stdout is not a terminal here: progress came as lines, one per 2 updates and one per validation.
    captured = capsys.readouterr()
    own = [line for line in (captured.out + captured.err).splitlines() if line.startswith("gptnano:")]
    assert own and max(map(len, own)) <= 200
    out = [line for line in captured.out.splitlines() if line.startswith("gptnano: step")]
    assert [re.match(r"gptnano: step (\d+)/12 \| (\S+)", line).groups() for line in out] == [
        ("2", "loss"), ("3", "val/loss"), ("4", "loss"), ("6", "loss"), ("6", "val/loss")], out
    assert re.fullmatch(r"gptnano: step 4/12 \| loss \d\.\d{4} \| [\d.]+k? tok/s \| ETA \d+s", out[2]), out[2]
    assert re.fullmatch(r"gptnano: step 6/12 \| val/loss \d\.\d{4} \| val/bpc \d\.\d{3} \| best \d\.\d{4} "
                        r"\| validation \d+s", out[4]), out[4]
