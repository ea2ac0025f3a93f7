"""Checkpoints: where and when they are written (``Checkpoint``), and how (``AtomicCheckpointIO``:
atomically, and read back only through gptnano's one safe reader)."""

import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path, PurePosixPath, PureWindowsPath

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptnano.checkpoint import read_checkpoint
from gptnano.errors import UserError
from gptnano.files import atomic_write, shown_path
from gptnano.train.callbacks import update_ended


def rebased(state: dict, dirpath: str) -> dict:
    """A ModelCheckpoint's saved state with every path that was in its saved folder moved into
    ``dirpath``: a run folder copied elsewhere (another machine) resumes with its best-model
    tracking, and overwrites its own ``last.ckpt`` and ``best.ckpt`` instead of forking into
    ``last-v1.ckpt``. Lightning keeps absolute paths, and drops the scores when the folder moved."""
    old = state.get("dirpath")
    if not old:
        return state
    pure = PureWindowsPath if "\\" in old or old[1:2] == ":" else PurePosixPath  # written on Windows?

    def move(path):
        if isinstance(path, str) and path and pure(path).parent == pure(old):
            return str(Path(dirpath) / pure(path).name)
        return path

    state = dict(state, dirpath=dirpath)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = move(state[key])
    if isinstance(state.get("best_k_models"), dict):
        state["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
    return state


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (``best.ckpt`` and ``last.ckpt`` at every validation),
    plus: ``last.ckpt`` is also refreshed by wall-clock time (``train_time_interval``)
    or every ``last_every_n_steps`` steps between validations, and Ctrl-C or SIGTERM stop
    training at the end of the current step and save ``last.ckpt`` first, so an
    interrupted run resumes with ``--ckpt_path last``. Files are written atomically
    (``AtomicCheckpointIO``): a crash leaves the previous or the new file, never half of one.
    A run folder moved or copied elsewhere resumes as the same run (``rebased``).

    Why a subclass: Lightning's own ``train_time_interval`` and ``every_n_train_steps``
    replace saving at validation (so ``best.ckpt`` would no longer follow the validation
    loss); here they only refresh ``last.ckpt``, and validations save as usual.

    Ctrl-C sets a flag in this process (no signal to itself, which Windows would turn into
    an immediate kill); at the end of the optimizer step the flag asks Lightning's loop to
    stop as its own SIGTERM handling does, agreed first by every process of a DDP run so
    that all of them stop after the same step. The exit status is then 130; SIGTERM from
    outside goes through Lightning's handler as before (POSIX) and exits with 143.

    Args:
        train_time_interval: Refresh last.ckpt at least this often during training (wall clock,
            e.g. "0:03:00"), so a crash loses at most this much work; None: only at validation.
        last_every_n_steps: Also refresh last.ckpt every this many optimizer steps (0: off).
    """

    def __init__(self, *args, train_time_interval: timedelta | None = timedelta(minutes=3),
                 last_every_n_steps: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if last_every_n_steps < 0 or train_time_interval is not None and train_time_interval.total_seconds() < 0:
            raise UserError("need last_every_n_steps >= 0 and a non-negative train_time_interval")
        self.last_every_n_steps = last_every_n_steps
        self.last_interval = train_time_interval
        self._last_refresh = time.monotonic()
        self._previous_sigint = None
        self._resumed_here = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Called just before load_state_dict: is the file being resumed one of this run folder's?
        # Then its saved paths name this folder, wherever it was when they were saved.
        resumed = trainer.ckpt_path
        self._resumed_here = bool(resumed and self.dirpath) and \
            Path(resumed).resolve().parent == Path(self.dirpath).resolve()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(rebased(state_dict, self.dirpath) if self._resumed_here else state_dict)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        CTRL_C.clear()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.getsignal(signal.SIGINT)

            def stop_after_step(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
                CTRL_C.set()  # read at the end of the step (on_train_batch_end)

            signal.signal(signal.SIGINT, stop_after_step)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _stop_agreed(self, trainer) -> bool:
        """Whether Ctrl-C was pressed on any process. Under DDP every process asks at every
        optimizer step (one small reduction; Lightning's loop already agrees on SIGTERM once a
        step), so the processes stop after the same step instead of some waiting forever."""
        if trainer.world_size > 1:
            return trainer.strategy.reduce_boolean_decision(CTRL_C.is_set(), all=False)
        return CTRL_C.is_set()

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # Training that ends between two saves (max_steps past the last validation or
        # last_every_n_steps point) must still leave last.ckpt at its final step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._restore_sigint()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not update_ended(trainer, batch_idx):
            return  # in the middle of an accumulated step: nothing is saved and nothing stops here
        if self._stop_agreed(trainer):
            CTRL_C.set()  # on every process, so each exits as stopped by Ctrl-C
            request_stop(trainer)  # Lightning's loop ends after this step, then on_exception saves
            return
        validation_follows = (batch_idx + 1) % trainer.val_check_batch == 0  # it saves last.ckpt (and best) itself
        if (self.save_last and not validation_follows and self._refresh_due(trainer)
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _refresh_due(self, trainer) -> bool:
        n, step = self.last_every_n_steps, trainer.global_step
        if n and step % n == 0:
            return True
        if self.last_interval is None:
            return False
        if trainer.world_size > 1:
            # Every rank must decide alike (saving is collective), so rank 0's clock decides,
            # broadcast only every log_every_n_steps steps: no collective in most steps.
            if step % max(1, trainer.log_every_n_steps):
                return False
            return trainer.strategy.broadcast(self._interval_passed())
        return self._interval_passed()

    def _interval_passed(self) -> bool:
        return time.monotonic() - self._last_refresh >= self.last_interval.total_seconds()

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_refresh = time.monotonic()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == "fit":
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            if trainer.is_global_zero:
                print(f"gptnano: stopped at step {trainer.global_step}, saved {shown_path(self.last_model_path)} (Ctrl-C or "
                      "SIGTERM); resume with --ckpt_path last", file=sys.stderr)
        self._restore_sigint()


# Set by Ctrl-C during fit (the in-process stop flag), cleared when training starts; the CLI reads
# it to exit with 130 (interrupted) rather than 143 (terminated).
CTRL_C = threading.Event()


def request_stop(trainer) -> None:
    """Ask Lightning's fit loop to stop at the end of the current step, exactly as its own
    SIGTERM handler does: it raises ``SIGTERMException`` there (``Checkpoint.on_exception``
    saves last.ckpt). Lightning has no public way to ask this (``trainer.should_stop`` means
    a normal end: no exception, and validation first), so this sets its private flag;
    tests/test_dependencies.py fails loudly if that changes."""
    trainer._signal_connector.received_sigterm = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically, read through gptnano's one safe reader.

    Writing: ``gptnano.files.atomic_write``, a temporary file in the checkpoint's own folder,
    flushed to disk, then renamed over the old file, so a process killed at any moment leaves
    the old checkpoint or the new one, never a torn file. (Lightning's default writes the
    temporary file in the system's temp folder and moves it: across file systems that move
    is a copy, which a kill can cut in half.)
    Reading: ``gptnano.checkpoint.read_checkpoint`` (``weights_only=True``, a known architecture).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), remove_stale=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        checkpoint = read_checkpoint(path)
        # An exported folder holds no Lightning version (Lightning would try to upgrade it): it is
        # read now, by this version. (Fit never gets one: the CLI sends a folder to --init_from.)
        checkpoint.setdefault("pytorch-lightning_version", lightning.__version__)
        return checkpoint
