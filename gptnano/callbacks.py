"""Callbacks the CLI adds: checkpoints, throughput, text samples, prediction output."""

import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptnano.checkpoint import read_checkpoint
from gptnano.errors import UserError
from gptnano.hardware import peak_flops
from gptnano.lit import uses_fsdp


def update_ended(trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended completed an optimizer update (it always does
    unless gradients are accumulated over several batches)."""
    return (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (``best.ckpt`` and ``last.ckpt`` at every validation),
    plus: ``last.ckpt`` is also refreshed by wall-clock time (``train_time_interval``)
    or every ``last_every_n_steps`` steps between validations, and Ctrl-C or SIGTERM stop
    training at the end of the current step and save ``last.ckpt`` first, so an
    interrupted run resumes with ``--ckpt_path last``. Files are written atomically
    (``AtomicCheckpointIO``): a crash leaves the previous or the new file, never half of one.

    Why a subclass: Lightning's own ``train_time_interval`` and ``every_n_train_steps``
    replace saving at validation (so ``best.ckpt`` would no longer follow the validation
    loss); here they only refresh ``last.ckpt``, and validations save as usual.

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

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.getsignal(signal.SIGINT)

            def stop_after_step(signum, frame):  # a second Ctrl-C interrupts at once
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop at the end of this step

            signal.signal(signal.SIGINT, stop_after_step)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # Training that ends between two saves (max_steps past the last validation or
        # last_every_n_steps point) must still leave last.ckpt at its final step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._restore_sigint()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        validation_follows = (batch_idx + 1) % trainer.val_check_batch == 0  # it saves last.ckpt (and best) itself
        if (self.save_last and not validation_follows and update_ended(trainer, batch_idx) and self._refresh_due(trainer)
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
                print(f"gptnano: stopped at step {trainer.global_step}, saved {self.last_model_path}", file=sys.stderr)
        self._restore_sigint()


class Throughput(L.Callback):
    """Tokens per second and model FLOPs utilisation (MFU) in the progress bar and
    the logger, averaged over the last ``window`` steps. MFU compares the model's
    training FLOPs (``net.flops_per_token()``) with the device's peak for the run's
    precision (``gptnano.hardware.peak_flops``: a GPU's datasheet, or measured here).
    A peak lower than what training really reaches would be a wrong peak, so MFU
    never reads above 1: the peak is raised to the rate reached, with a warning."""

    def __init__(self, window: int = 20, peak_flops: float | None = None):
        self.window, self.peak_flops = window, peak_flops
        self._times: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if self.peak_flops is None:
            self.peak_flops, self.peak_source = peak_flops(pl_module.device, str(trainer.precision))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._times.append(time.perf_counter())  # per micro-batch: each holds batch[0].numel() tokens
        self._times = self._times[-(self.window * trainer.accumulate_grad_batches + 1):]
        if len(self._times) < 2 or trainer.global_step % self.window or not update_ended(trainer, batch_idx):
            return  # logging costs ~1 ms a call: refresh once per window
        tokens = batch[0].numel() * trainer.world_size * (len(self._times) - 1)
        tok_s = tokens / (self._times[-1] - self._times[0])
        # As CPU tensors: the progress bar reads its values back at every step, and a Python
        # number would be put on the training device, one host-device sync per step on a GPU.
        pl_module.log("perf/tok_s", torch.tensor(tok_s), prog_bar=True, on_step=True, on_epoch=False,
                      rank_zero_only=True)
        if self.peak_flops:
            mfu = self.mfu(tok_s * pl_module.net.flops_per_token() / trainer.world_size)
            pl_module.log("perf/mfu", torch.tensor(mfu), prog_bar=True, on_step=True, on_epoch=False,
                          rank_zero_only=True)

    def mfu(self, flops_per_s: float) -> float:
        """Model FLOPs utilisation of one device doing ``flops_per_s``; at most 1."""
        if flops_per_s > self.peak_flops:
            if not getattr(self, "_warned", False):
                self._warned = True
                rank_zero_warn(f"training reaches {flops_per_s / 1e9:.1f} GFLOP/s, above the peak measured for MFU "
                               f"({self.peak_flops / 1e9:.1f}): MFU is now measured against the rate reached")
            self.peak_flops = flops_per_s
        return flops_per_s / self.peak_flops

    def on_validation_end(self, trainer, pl_module) -> None:
        self._times.clear()  # validation time is not training throughput


class TextSample(L.Callback):
    """After each validation, generate a short text and log it to TensorBoard, headed by the
    step and the sampling settings that made it."""

    def __init__(self, max_new_tokens: int = 200):
        self.max_new_tokens = max_new_tokens

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero or pl_module.tokenizer is None:
            return
        if uses_fsdp(trainer):
            return  # rank 0 alone holds a shard of the weights, not a network it could sample from
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        tokenizer = pl_module.tokenizer
        prompt = tokenizer.encode("\n")[None, :] if not tokenizer.unknown("\n") else torch.zeros(1, 1, dtype=torch.long)
        # Sampling must not disturb the training run's random streams: the CPU's and, on a GPU, its own.
        device = pl_module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            text = pl_module.sample(prompt, self.max_new_tokens)
        hp = pl_module.hparams
        heading = (f"step {trainer.global_step}: {self.max_new_tokens} new tokens, temperature {hp.temperature}, "
                   f"top_k {hp.top_k}, top_p {hp.top_p}, seed {hp.sample_seed}")
        # TensorBoard renders text as markdown: indent the sample to keep its line breaks.
        experiment.add_text("sample", heading + "\n\n    " + text.replace("\n", "\n    "), trainer.global_step)


class PredictionWriter(BasePredictionWriter):
    """Print the generated texts, in prompt order, and write them to
    ``predictions.txt`` in the run's log folder. Under DDP each rank generates
    for its share of the prompts and rank 0 gathers and writes them once."""

    def __init__(self, filename: str = "predictions.txt"):
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        mine = list(predictions)  # (prompt number, text) pairs from LitLM.predict_step
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, mine)
            mine = [pair for rank_pairs in gathered for pair in rank_pairs]
        if not trainer.is_global_zero:
            return
        texts = [text for _, text in sorted(dict(mine).items())]  # the sampler may pad with repeats
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.filename
        self.path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        for t in texts:
            sys.stdout.write(t + "\n")
        sys.stdout.flush()
        print(f"gptnano: predictions written to {self.path}", file=sys.stderr)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically, read through gptnano's one safe reader.

    Writing: a temporary file in the checkpoint's own folder, flushed to disk, then
    renamed over the old file. A rename within one file system is atomic, so a process
    killed at any moment leaves the old checkpoint or the new one, never a torn file.
    (Lightning's default writes the temporary file in the system's temp folder and moves
    it: across file systems that move is a copy, which a kill can cut in half.)
    Reading: ``gptnano.checkpoint.read_checkpoint`` (``weights_only=True``, a known architecture).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path)
