"""Callbacks the CLI adds: throughput and MFU, text samples, prediction output, early stopping."""

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities import rank_zero_warn

from gptnano.data.tokenizer import default_prompt
from gptnano.files import atomic_write
from gptnano.hardware import peak_flops
from gptnano.train.module import uses_fsdp


def update_ended(trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended completed an optimizer update: every
    ``accumulate_grad_batches``-th batch, and the last batch of an epoch (Lightning steps the
    optimizer there whatever is left of the accumulation)."""
    k = max(1, trainer.accumulate_grad_batches)
    return (batch_idx + 1) % k == 0 or (k > 1 and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def first_experiment_with(trainer, method: str):
    """The experiment (a TensorBoard SummaryWriter, say) of the first logger that has ``method``."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, method):
            return experiment
    return None


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
        experiment = first_experiment_with(trainer, "add_text")
        if experiment is None:
            return
        tokenizer = pl_module.tokenizer
        prompt = tokenizer.encode(default_prompt(tokenizer))[None, :]  # the prompt predict and generate default to
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
        # The log folder of the first logger that has one (the run's eval/version_N), else none: stdout
        # only, never a file in the working folder.
        folder = next((Path(x.log_dir) for x in trainer.loggers if getattr(x, "log_dir", None)), None)
        mine = list(predictions)  # (prompt number, text) pairs from LitLM.predict_step
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, mine)
            mine = [pair for rank_pairs in gathered for pair in rank_pairs]
        if not trainer.is_global_zero:
            return
        texts = [text for _, text in sorted(dict(mine).items())]  # the sampler may pad with repeats
        if folder is not None:
            self.path = atomic_write(folder / self.filename, "".join(t + "\n" for t in texts))
        for t in texts:
            sys.stdout.write(t + "\n")
        sys.stdout.flush()
        if folder is not None:
            print(f"gptnano: predictions written to {self.path}", file=sys.stderr)


OWN_STATE = "gptnano."  # before the state keys of gptnano's own callbacks of a kind a user may add too


class ResumableEarlyStopping(LightningEarlyStopping):
    """Lightning's EarlyStopping as gptnano's CLI configures it (``--early_stopping.*``), able to run
    beside a user's own (``--trainer.callbacks+=EarlyStopping``): its saved state has a key of its
    own, where two of Lightning's with one monitor and mode would share one. A resume takes its
    settings from the run's config like everything else: the ``patience`` it was built with stays
    (Lightning's would restore the saved one), and a resumed run has not stopped yet, whatever the
    saved run did."""

    @property
    def state_key(self) -> str:
        # gptnano.EarlyStopping{'monitor': ..., 'mode': ...}: the key earlier checkpoints' state moves to
        return OWN_STATE + "EarlyStopping" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience
        self.stopping_reason, self.stopping_reason_message = EarlyStoppingReason.NOT_STOPPED, None
