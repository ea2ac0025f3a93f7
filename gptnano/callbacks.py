"""Callbacks the CLI adds: checkpoints, throughput, text samples, prediction output."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: ``last.ckpt`` is also refreshed every
    ``last_every_n_steps`` optimizer steps (not only at validation), and Ctrl-C
    or SIGTERM stop training at the end of the current step and save
    ``last.ckpt`` first, so an interrupted run resumes with ``--ckpt_path last``.
    Lightning writes checkpoints atomically (temp file, then rename).

    Args:
        last_every_n_steps: Refresh last.ckpt every this many optimizer steps (0: only at validation).
    """

    def __init__(self, *args, last_every_n_steps: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_every_n_steps = last_every_n_steps
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
        n = self.last_every_n_steps
        validation_follows = (batch_idx + 1) % trainer.val_check_batch == 0  # it saves last.ckpt (and best) itself
        if (self.save_last and n and trainer.global_step % n == 0 and not validation_follows
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == "fit":
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            if trainer.is_global_zero:
                print(f"gptnano: stopped at step {trainer.global_step}, saved {self.last_model_path}", file=sys.stderr)
        self._restore_sigint()


def measure_peak_flops(dtype: torch.dtype = torch.float32, seconds: float = 0.3, device: str = "cpu") -> float:
    """Best FLOP/s of a matrix product here, over square and model-like shapes:
    the peak that MFU is measured against (this machine's, not a datasheet's)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for m, k, n in [(512, 512, 512), (1024, 1024, 1024), (2048, 128, 512), (2048, 512, 128)]:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        end = time.perf_counter() + seconds / 4
        while time.perf_counter() < end:
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * m * k * n / (time.perf_counter() - t))
    return best


class Throughput(L.Callback):
    """Tokens per second and model FLOPs utilisation (MFU) in the progress bar and
    the logger, averaged over the last ``window`` steps. MFU compares the model's
    training FLOPs (``net.flops_per_token()``) with the matrix-product peak of
    this very machine, measured at the start of training in the run's precision."""

    def __init__(self, window: int = 20, peak_flops: float | None = None):
        self.window, self.peak_flops = window, peak_flops
        self._times: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if self.peak_flops is None and pl_module.device.type in ("cpu", "cuda"):
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = measure_peak_flops(dtype, device=pl_module.device.type)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._times.append(time.perf_counter())
        self._times = self._times[-(self.window + 1):]
        if len(self._times) < 2 or trainer.global_step % self.window:
            return  # logging costs ~1 ms a call: refresh once per window
        tokens = batch[0].numel() * trainer.world_size * (len(self._times) - 1)
        tok_s = tokens / (self._times[-1] - self._times[0])
        pl_module.log("perf/tok_s", tok_s, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        if self.peak_flops:
            mfu = tok_s * pl_module.net.flops_per_token() / (self.peak_flops * trainer.world_size)
            pl_module.log("perf/mfu", mfu, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)

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
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        rng = torch.get_rng_state()  # sampling must not disturb the training RNG stream
        prompt = torch.zeros(1, 1, dtype=torch.long)
        if "\n" in pl_module.tokenizer.stoi:
            prompt[0, 0] = pl_module.tokenizer.stoi["\n"]
        text = pl_module.sample(prompt, self.max_new_tokens)
        torch.set_rng_state(rng)
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
