"""Checkpoints: where and when they are written (``Checkpoint``), and how (``AtomicCheckpointIO``:
atomically, and read back only through gptnano's one safe reader)."""

import shutil
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path, PurePosixPath, PureWindowsPath

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptnano import lines
from gptnano.checkpoint import read_checkpoint, step_of
from gptnano.errors import UserError
from gptnano.files import atomic_write, shown_path
from gptnano.train.callbacks import OWN_STATE, update_ended


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
    or every ``last_every_n_steps`` steps between validations, and Ctrl-C, SIGTERM or SIGHUP
    (a closed terminal, a dropped ssh session; on Windows CTRL_BREAK or closing the console)
    stop training at the end of the current step and save ``last.ckpt`` first, so an
    interrupted run resumes with ``--ckpt_path last``. With ``save_top_k`` above 1 (or -1) the
    kept files are named by their step and ``best.ckpt`` is a copy of the best of them. Files are written atomically
    (``AtomicCheckpointIO``): a crash leaves the previous or the new file, never half of one.
    A run folder moved or copied elsewhere resumes as the same run (``rebased``).

    Why a subclass: Lightning's own ``train_time_interval`` and ``every_n_train_steps``
    replace saving at validation (so ``best.ckpt`` would no longer follow the validation
    loss); here they only refresh ``last.ckpt``, and validations save as usual.

    Ctrl-C and SIGHUP set a flag in this process (no signal to itself, which Windows would turn
    into an immediate kill); at the end of the optimizer step the flag asks Lightning's loop to
    stop as its own SIGTERM handling does, agreed first by every process of a DDP run so
    that all of them stop after the same step. The exit status is then 130 (Ctrl-C) or 129
    (SIGHUP); SIGTERM goes through Lightning's handler (POSIX) and exits with 143. A SIGHUP
    that arrives ignored (``nohup``) stays ignored, and the save never waits on printing to a
    terminal that is gone.

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
        self._last_saved_step: int | None = None  # the step last.ckpt was last written at, in this process
        self._previous_handlers: dict = {}
        self._resumed_here = False
        if self.save_top_k not in (0, 1) and self.filename == BEST:
            self.filename = "{step}"  # step=250.ckpt, ...; best.ckpt is a copy of the best (on_validation_end)

    def turn_off(self) -> None:
        """Save nothing (``--trainer.enable_checkpointing false``): Lightning refuses a ModelCheckpoint
        beside that flag, so the CLI keeps this one, inert, and tells the Trainer checkpointing is on."""
        self.save_top_k, self.save_last, self.last_interval, self.last_every_n_steps = 0, False, None, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        best = Path(self.best_model_path) if self.best_model_path else None
        if best is not None and best.name != f"{BEST}.ckpt" and best.is_file() and trainer.is_global_zero:
            with best.open("rb") as source:  # best.ckpt: the best kept file, whole or not at all
                atomic_write(best.with_name(f"{BEST}.ckpt"), lambda f: shutil.copyfileobj(source, f))

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
        STOP.clear()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is None or (name != "SIGINT" and signal.getsignal(number) == signal.SIG_IGN):
                continue  # not on this OS; or ignored on purpose (nohup): it stays ignored
            self._previous_handlers[number] = signal.getsignal(number)

            def stop_after_step(signum, frame, name=name):
                if name == "SIGINT":
                    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
                STOP.set(name)  # read at the end of the step (on_train_batch_end)

            signal.signal(number, stop_after_step)

    def _restore_signals(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers.clear()

    def _stop_agreed(self, trainer) -> bool:
        """Whether a stop was asked for on any process. Under DDP every process asks at every
        optimizer step (one small reduction; Lightning's loop already agrees on SIGTERM once a
        step), so the processes stop after the same step instead of some waiting forever."""
        if trainer.world_size > 1:
            return trainer.strategy.reduce_boolean_decision(STOP.is_set(), all=False)
        return STOP.is_set()

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.fast_dev_run:  # Lightning's would write last.ckpt even then; its docs say fast_dev_run saves none
            super().on_train_end(trainer, pl_module)
        # Training that ends between two saves (max_steps past the last validation or
        # last_every_n_steps point) must still leave last.ckpt at its final step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._restore_signals()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not update_ended(trainer, batch_idx):
            return  # in the middle of an accumulated step: nothing is saved and nothing stops here
        if self._stop_agreed(trainer):
            STOP.set("SIGINT")  # on every process (one that saw no signal itself exits as after Ctrl-C)
            request_stop(trainer)  # Lightning's loop ends after this step, then on_exception saves
            return
        # An epoch's last step is saved here too when no validation follows it: Lightning's restart logic
        # resumes a checkpoint of this point as the next epoch's start. Saved only at on_train_end (the
        # epoch counted complete, its batches still counted done), a resume with more max_epochs ran
        # the next epoch for a single batch.
        epoch_end = batch_idx + 1 >= trainer.num_training_batches
        if (self.save_last and not validation_follows(trainer, batch_idx) and (epoch_end or self._refresh_due(trainer))
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
        self._last_saved_step = trainer.global_step  # last.ckpt holds this step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A stop asked for by a signal (Lightning's SIGTERM, or ours: then printing to a closed terminal
        # may be what raised, after the step had finished) saves the step reached.
        stopped = isinstance(exception, SIGTERMException) or STOP.is_set()
        if stopped and self.save_last and trainer.state.fn == "fit":
            # a stop right after this step's own save (a validation's) has nothing to save, but says so all the same
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            if trainer.is_global_zero and self._last_saved_step == trainer.global_step:
                how = {"SIGINT": "Ctrl-C"}.get(STOP.signal, STOP.signal or "SIGTERM")
                lines.say(f"stopped at step {trainer.global_step} by {how}, saved {shown_path(self.last_model_path)}; "
                          "resume with --ckpt_path last")
        self._restore_signals()


def own_checkpoint(trainer) -> "Checkpoint | None":
    """gptnano's checkpoint callback among the trainer's (not ``trainer.checkpoint_callback``, the first
    of any: a user's own ModelCheckpoint may come before it)."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, Checkpoint)), None)


# Signals that stop a fit after its step in this process (SIGTERM: Lightning's own handler), and
# the exit status of each, as a shell reports a process the signal ended.
STOP_SIGNALS = ("SIGINT", "SIGHUP", "SIGBREAK")
EXIT_STATUS = {"SIGINT": 130, "SIGHUP": 129, "SIGBREAK": 149, "SIGTERM": 143}
BEST = "best"


class StopRequest:
    """Which signal asked this process to stop after its current step (None: none yet)."""

    def __init__(self):
        self.signal: str | None = None

    def set(self, name: str = "SIGINT") -> None:
        self.signal = self.signal or name

    def clear(self) -> None:
        self.signal = None

    def is_set(self) -> bool:
        return self.signal is not None


STOP = StopRequest()  # set by a stop signal during fit, cleared when training starts; the CLI reads it


def stop_exit_status() -> int:
    """The exit status of a fit stopped by a signal: 130 Ctrl-C, 129 SIGHUP, 143 SIGTERM."""
    return EXIT_STATUS[STOP.signal or "SIGTERM"]


def validation_follows(trainer, batch_idx: int) -> bool:
    """Whether Lightning validates after this batch (then it saves last.ckpt and best itself), as
    its training loop decides for batch-counted intervals (a time-based one is never predicted)."""
    every, loop = trainer.check_val_every_n_epoch, trainer.fit_loop.epoch_loop
    if every is not None and (trainer.current_epoch + 1) % every:
        return False
    n = trainer.val_check_batch
    if n is None or n == float("inf"):
        return loop.batch_progress.is_last_batch
    return ((loop.total_batch_idx if every is None else batch_idx) + 1) % n == 0


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
        if "config" not in (checkpoint.get("gptnano") or {}):
            # Written before gptnano's EarlyStopping had a state key of its own (a user's could not run
            # beside it): its saved state moves to today's key.
            states = checkpoint.get("callbacks") or {}
            for key in [k for k in states if str(k).startswith("EarlyStopping{")]:
                states.setdefault(OWN_STATE + key, states.pop(key))
        # An exported folder holds no Lightning version (Lightning would try to upgrade it): it is
        # read now, by this version. (Fit never gets one: the CLI sends a folder to --init_from.)
        checkpoint.setdefault("pytorch-lightning_version", lightning.__version__)
        return checkpoint


def check_run_folder(folder: Path, ckpt_path: str | None, saved: dict | None, init_from: str | None,
                     fast_dev_run) -> None:
    """Refuse a fit that would overwrite another run's checkpoints in ``folder``, or rewind its own
    last.ckpt by resuming from an older checkpoint (``ckpt_path``, read as ``saved``) there.

    Raises:
        UserError: naming the folder and what to do instead.
    """
    here = bool(ckpt_path) and Path(ckpt_path).resolve().parent == folder.resolve()
    if init_from and folder.resolve() in (Path(init_from).resolve(), Path(init_from).resolve().parent):
        raise UserError(f"--init_from {init_from}: the new run needs a folder of its own, not the "
                        f"source's {folder}: give another --run_name")
    if folder.is_dir() and any(folder.glob("*.ckpt")) and not here and not fast_dev_run:
        how = " (without --init_from)" if init_from else ""
        raise UserError(f"{folder} already holds a run: resume it with --ckpt_path last{how}, "
                        f"or start a new one with --run_name NAME (or delete {folder})")
    last = folder / "last.ckpt"
    if here and Path(ckpt_path).name != last.name and last.is_file():
        at, behind = step_of(saved), step_of(torch.load(last, weights_only=True, mmap=True))
        if at < behind:
            raise UserError(f"--ckpt_path {ckpt_path} is at step {at}, but {last} is at step {behind}: resuming it "
                            f"here would rewind the run and lose steps {at + 1}-{behind}; resume with --ckpt_path "
                            "last, or train on from it as a new run with --run_name NAME")
