"""The end of a `gptnano fit` in one line: why training stopped, and where its checkpoints are.

Lightning ends a run with "`Trainer.fit` stopped: `max_steps=N` reached." at best (hidden by
gptnano/cli/quiet.py), and with no word at all when early stopping or ``max_time`` stops it.
``RunReport`` says it for every way a fit ends without an error, e.g.

    gptnano: fit ended at step 1000/1000: max_steps reached | best val/loss 1.6379 (best.ckpt) | checkpoints in checkpoints/gpt
    gptnano: fit ended at step 10/30: early stopping: val/loss did not improve by more than 10 in 1 validation (patience 1) | ...

The other ends have their own line: Ctrl-C, SIGTERM or SIGHUP ``gptnano: stopped at step N by ..., saved ...``
(gptnano/train/checkpointing.py), a diverging run ``gptnano: error: training stopped: ...``
(gptnano/train/guard.py), any other error ``gptnano: error: ...``.
"""

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, Timer
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from gptnano import lines
from gptnano.files import shown_path


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def early_stopping_reason(callback) -> str | None:
    """Why an EarlyStopping callback stopped this fit, in words (None: it did not)."""
    if callback is None or callback.stopping_reason == EarlyStoppingReason.NOT_STOPPED:
        return None
    reason, monitor = callback.stopping_reason, callback.monitor
    if reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
        return (f"early stopping: {monitor} did not improve by more than {abs(callback.min_delta):g} "
                f"in {_plural(callback.wait_count, 'validation')} (patience {callback.patience})")
    if reason == EarlyStoppingReason.STOPPING_THRESHOLD:
        return f"early stopping: {monitor} reached stopping_threshold {callback.stopping_threshold:g}"
    if reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD:
        return f"early stopping: {monitor} passed divergence_threshold {callback.divergence_threshold:g}"
    return f"early stopping: {monitor} was not finite"


def why_fit_ended(trainer) -> str:
    """Why the fit loop ended, in words: an early stopping (gptnano's or a user's: any that stopped it,
    with its metric and patience), max_time, max_epochs, max_steps, or a stop asked for from outside."""
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and (reason := early_stopping_reason(callback)):
            return reason
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        return f"max_time reached after {lines.duration(timer.time_elapsed('train'))} of training"
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return "max_steps reached"
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch:
        return f"max_epochs reached ({_plural(trainer.max_epochs, 'epoch')})"
    return "stopped on request before max_steps"


def where_checkpoints_are(trainer) -> list[str]:
    """The fields of the end-of-fit line about checkpoints: for every checkpoint callback (gptnano's and a
    user's own), the best score it keeps and its folder."""
    fields = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.dirpath or \
                not (callback.save_top_k or callback.save_last):
            continue
        if callback.best_model_score is not None and callback.best_model_path:
            name = "best.ckpt" if getattr(callback, "filename", None) != "best" and \
                (Path(callback.dirpath) / "best.ckpt").is_file() else Path(callback.best_model_path).name
            fields.append(f"best {callback.monitor} {float(callback.best_model_score):.4f} ({name})")
        fields.append(f"checkpoints in {shown_path(callback.dirpath)}")
    return fields or ["no checkpoints (checkpointing is off)"]


class RunReport(L.Callback):
    """One line at the end of every `fit` that ends without an error: why it ended and where its
    checkpoints are (module docstring)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            steps = lines.steps_field(trainer.global_step, trainer.max_steps)
            lines.say(f"fit ended at {steps}: {why_fit_ended(trainer)}", *where_checkpoints_are(trainer))
