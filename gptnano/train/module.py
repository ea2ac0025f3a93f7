"""The one LightningModule: it trains any ``LanguageModel``.

Nothing here knows which architecture it drives. It owns the loss, the optimizer
(gptnano/train/optim.py: Muon + AdamW, or AdamW alone) with its schedules (the learning
rate's warmup, then cosine or warmup-stable-decay; Muon's momentum warmup), the metrics
(loss, bits per char, perplexity) and sampling; Lightning's Trainer owns everything else,
with gptnano's callbacks (gptnano/train/: throughput, text samples, checkpoints, the
non-finite guard).
"""

import math
import os
import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import MeanMetric

from gptnano import lines
from gptnano.data.tokenizer import make_tokenizer
from gptnano.errors import UserError
from gptnano.files import COMPILE_CACHE_ENV
from gptnano.hardware import fast_dtype
from gptnano.models.base import LanguageModel
from gptnano.sampling import check_settings, generate
from gptnano.train.optim import build_optimizer, group_settings
from gptnano.train.steps import next_token_loss


def uses_fsdp(trainer) -> bool:
    """Whether the Trainer shards the weights across processes (FSDP)."""
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def compile_refused(net_class: type) -> str | None:
    """The one line that refuses `fit --model.compile true` for an architecture torch.compile does
    not pay for (its ``LanguageModel.compile_refusal``), or None where it does."""
    reason = getattr(net_class, "compile_refusal", None)
    return (f"--model.compile true does not pay for the {net_class.__name__}: {reason}; train it with "
            "--model.compile false") if reason else None


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, cosine decay to ``min_ratio`` at ``decay_steps``, then flat."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def warmup_stable_decay(step: int, warmup_steps: int, decay_steps: int, min_ratio: float,
                        cooldown_fraction: float) -> float:
    """LR multiplier: linear warmup to 1, flat at 1, then linear decay to ``min_ratio`` over the last
    ``cooldown_fraction`` of the ``decay_steps`` (never into the warmup), then flat: the trapezoid
    of Zhai et al. 2022 and Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond
    Fixed Training Durations"), which matches a cosine with a cooldown of ~20 % of the run."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    if math.isinf(decay_steps):
        return 1.0  # no end in sight (max_time alone bounds the run): the plateau
    cooldown_start = max(warmup_steps, round(decay_steps * (1.0 - cooldown_fraction)))
    if step < cooldown_start:
        return 1.0
    progress = (step - cooldown_start) / max(1, decay_steps - cooldown_start)
    return 1.0 - progress * (1.0 - min_ratio)


MUON_MOMENTUM_START = 0.85  # where a momentum warmup starts (modded-nanogpt's)


def muon_momentum_at(step: int, warmup_steps: int, momentum: float) -> float:
    """Muon's momentum for optimizer step ``step``: linear from 0.85 to ``momentum`` over the first
    ``warmup_steps`` steps, then ``momentum`` (modded-nanogpt, Jordan et al. 2024: 0.85 -> 0.95 over
    300 steps): the first steps average gradients over ~1 / (1 - 0.85) = 7 steps rather than 20."""
    if step >= warmup_steps:
        return momentum
    fraction = step / warmup_steps
    return (1.0 - fraction) * MUON_MOMENTUM_START + fraction * momentum


class LitLM(L.LightningModule):
    """Trains, evaluates and samples any gptnano architecture.

    Args:
        net: The architecture (GPT, RNN, Backpack, CNN): give its class_path and init_args.
        vocab: The characters of the vocabulary, linked from the data module and stored in
            every checkpoint so a checkpoint alone can decode text. Do not set by hand.
        tokenizer: The tokenizer's kind ("char" or "byte"), linked from the data module and
            stored in every checkpoint beside vocab. Do not set by hand.
        learning_rate: Peak learning rate, reached after the warmup.
        min_lr: Learning rate at the end of the decay.
        warmup_steps: Optimizer steps of linear warmup.
        lr_decay_steps: Step at which the decay reaches min_lr (default: trainer.max_steps).
        lr_schedule: The shape after the warmup. "cosine": cosine decay from the peak to min_lr
            (nanoGPT's). "wsd" (warmup-stable-decay, a trapezoid): the peak held, then a linear
            decay to min_lr over the last cooldown_fraction of the run (Zhai et al. 2022, "Scaling
            Vision Transformers"; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
            Beyond Fixed Training Durations", which finds it matches the cosine with a ~20 %
            cooldown; modded-nanogpt's stable-then-linear cooldown).
        cooldown_fraction: With lr_schedule "wsd": the fraction of the run (of lr_decay_steps)
            spent decaying (Hägele et al. 2024: 0.2); 0 holds the peak to the end.
        weight_decay: AdamW weight decay, applied to weight matrices and embeddings only.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        optimizer: "adamw" trains every parameter with AdamW; "muon" trains the weight
            matrices inside the network (every nn.Linear but the output head) with Muon and
            the rest (embeddings, biases, norms, conv kernels) with AdamW. See gptnano/train/optim.py.
        muon_lr: Muon's peak learning rate (the schedule scales it like learning_rate).
        muon_momentum: Muon's momentum.
        muon_momentum_warmup_steps: Optimizer steps over which Muon's momentum goes linearly
            from 0.85 to muon_momentum (modded-nanogpt, Jordan et al. 2024: 0.85 -> 0.95 over
            its first 300 steps); 0: muon_momentum from the start.
        muon_weight_decay: Muon's decoupled weight decay.
        muon_dtype: dtype of Muon's Newton-Schulz products: "auto" takes bf16 where bf16
            products are fast on the training device (measured on a CPU; native on
            Ampere-or-later GPUs) and fp32 elsewhere (a CPU without native bf16 runs them
            ~75x slower); "bfloat16" or "float32" force one.
        max_new_tokens: Tokens (characters, or bytes) to generate per prompt in `predict` (and for TensorBoard samples).
        temperature: Sampling temperature; 0 picks the most likely character (greedy).
        top_k: Sample only among the k most likely characters (None: all).
        top_p: Sample only from the smallest set of characters whose probability adds up to top_p (None: all).
        sample_seed: Seed for sampling, so `predict` is repeatable (None: the global seed).
        compile: Train through torch.compile (validation and generation stay eager). The first
            step compiles: ~40 s for the GPT on a 2-core CPU the first time, ~3 s once cached
            (by the `gptnano` command in torch-compile/ of gptnano's per-user cache folder, e.g.
            ~/.cache/gptnano, unless TORCHINDUCTOR_CACHE_DIR says otherwise:
            gptnano.files.keep_compile_cache). Then it trains the GPT, CNN and Backpack faster;
            the RNN is refused (compiling unrolls its recurrence: minutes, and no faster). See
            docs/results.md, "Training speed". Worth it for long runs only.
    """

    def __init__(
        self,
        net: LanguageModel,
        vocab: str = "",
        tokenizer: str = "char",
        learning_rate: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        lr_schedule: Literal["cosine", "wsd"] = "cosine",
        cooldown_fraction: float = 0.2,
        weight_decay: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_momentum_warmup_steps: int = 0,
        muon_weight_decay: float = 0.0,
        muon_dtype: Literal["auto", "bfloat16", "float32"] = "auto",
        max_new_tokens: int = 500,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        sample_seed: int | None = None,
        compile: bool = False,
    ):
        super().__init__()
        if learning_rate <= 0 or min_lr < 0 or warmup_steps < 0:
            raise UserError("need learning_rate > 0, min_lr >= 0 and warmup_steps >= 0")
        if muon_lr <= 0 or not 0 <= muon_momentum < 1 or muon_weight_decay < 0:
            raise UserError("need muon_lr > 0, 0 <= muon_momentum < 1 and muon_weight_decay >= 0")
        if min_lr > learning_rate:
            raise UserError(f"min_lr {min_lr:g} is above learning_rate {learning_rate:g}: the cosine decays from "
                            "learning_rate down to min_lr (give both)")
        if lr_decay_steps is not None and lr_decay_steps <= 0:
            raise UserError("need lr_decay_steps > 0 (leave it out to decay over trainer.max_steps)")
        if not 0 <= cooldown_fraction <= 1 or muon_momentum_warmup_steps < 0:
            raise UserError("need 0 <= cooldown_fraction <= 1 and muon_momentum_warmup_steps >= 0")
        if weight_decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise UserError("need weight_decay >= 0, 0 <= beta1 < 1 and 0 <= beta2 < 1")
        check_settings(max_new_tokens, temperature, top_k, top_p)
        self.save_hyperparameters()
        if isinstance(self.hparams.get("net"), torch.nn.Module):
            # Built in Python rather than by the CLI: keep checkpoints plain data
            # (weights_only loading); the CLI stores the net's class_path/init_args.
            self.hparams.pop("net")
        self.net = net
        self.tokenizer = make_tokenizer(vocab, tokenizer) if vocab or tokenizer != "char" else None
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._step_seed = None
        self._train_forward = None  # the compiled forward, built on the first training step
        self._compiling_since = None  # when the first compiled step began (perf_counter), until it ends
        self._random = None  # whether a training step draws random numbers (active dropout)

    # ----- training -------------------------------------------------------
    def on_fit_start(self) -> None:
        refusal = compile_refused(type(self.net)) if self.hparams.get("compile") else None
        if refusal:  # here, not in __init__: predict and generate still read a checkpoint trained compiled
            raise UserError(refusal)

    def on_train_start(self) -> None:
        # Dropout is re-seeded at every step from (run seed, step, rank), so a run
        # resumed from a checkpoint draws the same dropout masks as an unbroken one.
        if self._step_seed is None:  # the run's seed, read once (per-step re-seeding changes initial_seed)
            self._step_seed = torch.initial_seed()
        if self.trainer.ckpt_path:
            # Lightning has just restored the optimizer's groups (learning rates, betas, weight decay,
            # momentum) and the schedule's peaks as they were saved: the hyper-parameters (the
            # checkpoint's, or typed on this resume) must be what trains from here on.
            self.apply_optimizer_settings(self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler)

    def apply_optimizer_settings(self, optimizer: torch.optim.Optimizer, schedule) -> None:
        """Set every parameter group's settings and the schedule from the hyper-parameters, the
        learning rate (and Muon's momentum) being the schedule's at the current step
        (``schedule.last_epoch``). For a run resumed with the settings it was saved with, this
        changes nothing (the same floats); with a new ``learning_rate`` / ``min_lr`` / warmup /
        decay / schedule, or a momentum warmup, each is the new schedule's at this step, as if the
        run had had it from the start."""
        hp = self.hparams
        peaks = group_settings(learning_rate=hp.learning_rate, weight_decay=hp.weight_decay, beta1=hp.beta1,
                               beta2=hp.beta2, muon_lr=hp.muon_lr, muon_momentum=hp.muon_momentum,
                               muon_weight_decay=hp.muon_weight_decay)
        multiplier = self._lr_multiplier()
        schedule.lr_lambdas = [multiplier] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            wanted = peaks.get(group.get("name"), {})
            group.update({k: v for k, v in wanted.items() if k != "lr" and k in group})
            if "lr" in wanted:
                group["initial_lr"] = wanted["lr"]
        schedule.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, schedule.base_lrs):
            group["lr"] = base * multiplier(schedule.last_epoch)  # as LambdaLR computes it
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
        self._set_muon_momentum(optimizer, schedule.last_epoch)

    def _set_muon_momentum(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Muon's momentum for optimizer step ``step``: a pure function of the step, as the learning rate is."""
        hp = self.hparams
        momentum = muon_momentum_at(step, hp.muon_momentum_warmup_steps, hp.muon_momentum)
        for group in optimizer.param_groups:
            if group.get("muon"):
                group["momentum"] = momentum

    def lr_scheduler_step(self, scheduler, metric) -> None:
        super().lr_scheduler_step(scheduler, metric)  # the learning rate of the next step
        if self.hparams.muon_momentum_warmup_steps:  # and its momentum
            self._set_muon_momentum(scheduler.optimizer, scheduler.last_epoch)

    def decay_steps(self) -> float:
        """Steps the schedule decays over when lr_decay_steps is not given: ``trainer.max_steps``, or with
        ``max_steps -1`` Lightning's estimate of the run's steps from max_epochs (infinite when only
        max_time bounds the run: the rate then stays at its peak after the warmup)."""
        trainer = self.trainer
        return trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches

    def _lr_multiplier(self):
        """The schedule's multiplier of the peak learning rates, as a function of the step."""
        hp = self.hparams
        decay_steps = hp.lr_decay_steps or self.decay_steps()
        min_ratio = hp.min_lr / hp.learning_rate
        if hp.lr_schedule == "wsd":
            return lambda step: warmup_stable_decay(step, hp.warmup_steps, decay_steps, min_ratio, hp.cooldown_fraction)
        return lambda step: warmup_cosine(step, hp.warmup_steps, decay_steps, min_ratio)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if not self._draws_random_numbers():
            return  # nothing random happens in a step without active dropout: no seeding to pay for
        seed = hash((self._step_seed, self.global_step, self.global_rank)) % 2**63
        # Only the generator this step's dropout draws from (torch.manual_seed would seed
        # every backend: ~1.7 ms a step on the CPU). Seeding is host-side bookkeeping, no sync.
        if self.device.type == "cuda":
            torch.cuda.default_generators[self.device.index or 0].manual_seed(seed)
        elif self.device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._compiling_since is not None:
            self._say_rank_zero(f"torch.compile: first step done in {lines.duration(time.perf_counter() - self._compiling_since)}",
                                f"cache {os.environ.get(COMPILE_CACHE_ENV, 'in the temporary folder')}")
            self._compiling_since = None

    def _say_rank_zero(self, *fields: str) -> None:
        if self._trainer is None or self.trainer.is_global_zero:
            lines.say(*fields)

    def _draws_random_numbers(self) -> bool:
        if self._random is None:
            self._random = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.net.modules())
        return self._random

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        forward = self.net
        if self.hparams.get("compile") and self.training:
            if self._train_forward is None:
                # A compiled *function*, not a module attribute: the checkpoint keeps
                # the plain state_dict keys of self.net.
                self._train_forward = torch.compile(self.net.forward)
                self._compiling_since = time.perf_counter()
                self._say_rank_zero("torch.compile: compiling at the first step",
                                    "tens of seconds the first time on a machine, seconds once cached")
            forward = self._train_forward
        return next_token_loss(forward(idx), targets, reduction)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        self.log("train/loss", loss)  # read by the logger every log_every_n_steps steps
        if self._is_logging_step():
            # The progress bar reads its values back at every step (a host-device sync on a
            # GPU): it gets a copy on the CPU, made at logging steps only.
            self.log("loss", loss.detach().cpu(), prog_bar=True, logger=False)
        return loss

    def _is_logging_step(self) -> bool:
        trainer = self._trainer  # None outside a Trainer (self.trainer would raise)
        return trainer is None or self.global_step % max(1, trainer.log_every_n_steps) == 0

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "muon" and uses_fsdp(self.trainer):
            # FSDP hands the optimizer flat shards; Muon must see whole matrices.
            raise UserError("--model.optimizer muon does not work with FSDP (it needs whole matrices): "
                            "use --model.optimizer adamw")
        fused = (all(p.device.type in ("cpu", "cuda") for p in self.net.parameters())
                 and not str(self.trainer.precision).startswith("16"))
        ns_dtype = fast_dtype(self.device.type) if hp.muon_dtype == "auto" else getattr(torch, hp.muon_dtype)
        optimizer = build_optimizer(self.net, optimizer=hp.optimizer, learning_rate=hp.learning_rate,
                                    weight_decay=hp.weight_decay, beta1=hp.beta1, beta2=hp.beta2, muon_lr=hp.muon_lr,
                                    muon_momentum=hp.muon_momentum, muon_weight_decay=hp.muon_weight_decay,
                                    ns_dtype=ns_dtype, fused=fused)
        # A plain function (not an object): LambdaLR then saves none of its values in the checkpoint,
        # and a resume computes the schedule from the hyper-parameters (apply_optimizer_settings).
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_multiplier())
        self._set_muon_momentum(optimizer, schedule.last_epoch)  # step 0's (muon_momentum without a warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer
        # (it assumes fp16 loss scaling); with fp32 or bf16 there is nothing to
        # unscale, so clip here exactly as the plugin would.
        if not gradient_clip_val or not optimizer.defaults.get("fused"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if uses_fsdp(self.trainer) and gradient_clip_algorithm != "value":
            self.trainer.model.clip_grad_norm_(gradient_clip_val)  # FSDP's: the norm over every rank's shard
        elif gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    # ----- evaluation -----------------------------------------------------
    def _eval_step(self, batch, metric: MeanMetric) -> None:
        idx, targets = batch
        n = (targets != -100).sum()  # 0 in a batch a DDP rank runs only to keep in step with the others
        metric.update(self.loss(idx, targets, reduction="sum") / n.clamp(min=1), weight=n)

    def _eval_end(self, metric: MeanMetric, prefix: str) -> None:
        loss = metric.compute()  # token-weighted mean over every rank's windows
        metric.reset()
        metrics = {f"{prefix}/loss": loss, f"{prefix}/bpc": loss / math.log(2), f"{prefix}/ppl": loss.exp()}
        fitting = self.trainer.state.fn == "fit"
        self.log_dict(metrics, prog_bar=prefix == "val", sync_dist=False, logger=not fitting)
        if fitting and not self.trainer.sanity_checking:
            # To the loggers at the step of the weights just scored: Lightning's own logging would
            # put them at global_step - 1, the step of the training loss before the last update.
            for logger in self.loggers:
                logger.log_metrics({k: v.item() for k, v in metrics.items()}, step=self.global_step)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self._eval_end(self.val_loss, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._eval_end(self.test_loss, "test")

    # ----- generation -----------------------------------------------------
    def sample(self, prompt: torch.Tensor, max_new_tokens: int | None = None) -> str:
        """Continue the encoded ``prompt[1, T]`` and return prompt + continuation as text."""
        hp = self.hparams
        if self.tokenizer is None:
            raise UserError("this model has no vocabulary to decode with (was it built outside the CLI?)")
        prompt = prompt.to(self.device)
        generator = None
        if hp.sample_seed is not None:  # on the device that samples: multinomial needs them to agree
            generator = torch.Generator(device=prompt.device).manual_seed(hp.sample_seed)
        was_training = self.net.training
        self.net.eval()
        # In fp32 whatever the run trains in, so a seed gives the same text here (predict, the
        # TensorBoard samples) as in `gptnano generate`, which samples from the checkpoint in fp32.
        with torch.autocast(self.device.type, enabled=False):
            out = generate(self.net, prompt, hp.max_new_tokens if max_new_tokens is None else max_new_tokens,
                           temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p, generator=generator)
        self.net.train(was_training)
        return self.tokenizer.decode(out[0].tolist())

    def predict_step(self, batch: tuple[int, torch.Tensor], batch_idx: int) -> tuple[int, str]:
        """``batch`` is (prompt number, encoded prompt[1, T]); returns (prompt number, text)."""
        number, prompt = batch
        return int(number), self.sample(prompt)
