"""Progress as plain lines when the output is a file, not a terminal.

A progress bar redraws itself with carriage returns: in a log file (``> run.log``,
nohup, SLURM, ``| tee``, CI) every redraw stays, and the 1000-step quick start wrote
334 KB, with single "lines" of up to 90 KB that ``tail`` and ``grep`` cannot use.
``LogLines`` takes the bar's place there and writes one line every
``log_every_n_steps`` optimizer steps and one per validation, in gptnano's one line
format (gptnano/lines.py), e.g.::

    gptnano: step 200/1000 | loss 1.8421 | 21.3k tok/s | ETA 1m04s
    gptnano: step 250/1000 | val/loss 1.7962 | val/bpc 2.591 | best 1.7962 | validation 2s

The CLI installs it when the bar's stream (stdout) is not a terminal; a terminal keeps
Lightning's bar.
"""

import sys
import time

from lightning.pytorch.callbacks import ProgressBar

from gptnano import lines
from gptnano.numbers import quantity
from gptnano.train.callbacks import update_ended
from gptnano.train.checkpointing import own_checkpoint


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class LogLines(ProgressBar):
    """Lightning's progress bar slot, filled with plain lines (module docstring): at every
    ``log_every_n_steps``-th optimizer step the step, the loss of that update (the mean over
    its accumulated batches), tokens per second since the last line (validation time left
    out) and the time left at that pace; after each validation its loss, bits per token and
    the best loss so far. Lines go to ``file`` (default: stdout, where the bar would draw),
    from rank 0 only. The loss is read from the device only on the steps that print.

    Args:
        file: The stream to write to; None: ``sys.stdout`` at the moment of writing.
    """

    def __init__(self, file=None):
        super().__init__()
        self.file = file
        self._enabled = True
        self._loss = None  # sum of this update's micro-batch losses, on the device
        self._tokens = 0  # trained since the last line, all ranks
        self._since: tuple[float, int] = (0.0, 0)  # (time, step) of the last line
        self._validation_started = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _say(self, trainer, *fields: str) -> None:
        if self._enabled and trainer.is_global_zero:
            lines.say(*fields, file=self.file or sys.stdout)

    def on_train_start(self, trainer, pl_module) -> None:
        self._since = (time.perf_counter(), trainer.global_step)
        self._tokens, self._loss = 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if loss is not None:  # already divided by accumulate_grad_batches: the sum is the update's mean
            loss = loss.detach()
            self._loss = loss if self._loss is None else self._loss + loss
        self._tokens += batch[0].numel() * trainer.world_size
        if not update_ended(trainer, batch_idx):
            return
        step, update_loss, self._loss = trainer.global_step, self._loss, None
        if step % max(1, trainer.log_every_n_steps) and step != trainer.max_steps:
            return
        now = time.perf_counter()
        seconds, steps = now - self._since[0], step - self._since[1]
        rate = f"{quantity(self._tokens / seconds)} tok/s" if seconds > 0 and steps > 0 else ""
        eta = ""
        if trainer.max_steps and trainer.max_steps > 0 and steps > 0:
            eta = f"ETA {lines.duration((trainer.max_steps - step) * seconds / steps)}"
        shown = f"loss {float(update_loss):.4f}" if update_loss is not None else ""
        self._say(trainer, lines.steps_field(step, trainer.max_steps), shown, rate, eta)
        self._since, self._tokens = (now, step), 0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        took = time.perf_counter() - self._validation_started
        self._since = (self._since[0] + took, self._since[1])  # the rate and ETA are training's own
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        fields = [f"{name} {float(metrics[name]):.{digits}f}" for name, digits in (("val/loss", 4), ("val/bpc", 3))
                  if name in metrics]
        # The checkpoint callback updates its best after this hook (Lightning calls checkpointing last).
        scores = [float(s) for s in (getattr(own_checkpoint(trainer), "best_model_score", None),
                                     metrics.get("val/loss")) if s is not None]
        if scores:
            fields.append(f"best {min(scores):.4f}")
        self._say(trainer, lines.steps_field(trainer.global_step, trainer.max_steps), *fields,
                  f"validation {lines.duration(took)}")
