"""Training health, live: the statistics makemore part 3 (Karpathy 2022, "Building makemore
Part 3: Activations & Gradients, BatchNorm") plots by hand, logged to TensorBoard as a run
trains, and one line when one of them leaves its healthy range.

Every ``every_n_steps`` steps, per block: what the block outputs (mean, std), how saturated
its nonlinearities are, how spread its attention is, and how large the gradients and the
updates are next to the weights. Forward hooks exist during those steps only; they read
without recording autograd history and without drawing random numbers, so a run trains
bit-identically with the callback or without it. docs/tensorboard.md says how to read them.
"""

import math
import re
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import lightning as L
import torch
from torch import nn

from gptnano import lines
from gptnano.models.backpack import Backpack
from gptnano.models.cnn import ConvBlock
from gptnano.models.gpt import MLP, Block, CausalSelfAttention
from gptnano.models.rnn import ElmanLayer
from gptnano.train.callbacks import update_ended

TANH_EDGE = 0.97  # |tanh| past this: the local gradient 1 - h^2 is below 0.06
GELU_FLAT = -3.0  # GELU inputs below this: output within 0.004 of zero, slope below 0.012
# Attention probabilities are recomputed for as many of the batch's sequences as fit in this
# many elements (at least one): the fused attention never builds the (B, heads, T, T) matrix,
# and at long contexts a whole batch's would not fit beside the training step.
PROBE_ELEMENTS = 2**24


# ----- what is measured -------------------------------------------------------------
def share(mask: torch.Tensor) -> torch.Tensor:
    return mask.float().mean()


def leading(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The first sequences of ``x[B, T, ...]`` whose attention matrices, ``heads`` of ``T x T``
    each, hold at most PROBE_ELEMENTS numbers (at least one sequence)."""
    T = x.size(1)
    return x[: max(1, PROBE_ELEMENTS // (heads * T * T))]


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of the distributions along the last axis of ``p`` (rows of
    attention probabilities: over batch, heads and positions). ``entr`` counts 0 log 0 as 0."""
    return torch.special.entr(p.float()).sum(-1).mean()


def group_of(name: str) -> str:
    """The part of the network a module or parameter (by its dotted name) belongs to:
    ``block3`` for anything in ``blocks.3``, ``embed`` for the embeddings, ``senses`` for the
    Backpack's sense network and alpha heads, ``head`` for the final LayerNorm and output head.
    Wrappers' names (``_orig_mod.``, ``_fsdp_wrapped_module.``) are skipped."""
    if match := re.search(r"(?:^|\.)blocks\.(\d+)(?:\.|$)", name):
        return f"block{match[1]}"
    first = next((part for part in name.split(".") if not part.startswith("_")), "")
    return {"wte": "embed", "wpe": "embed", "sense_net": "senses", "sense_qk": "senses",
            "ln_f": "head", "lm_head": "head"}.get(first, first or "net")


Record = Callable[[str, torch.Tensor], None]


def probes(net: nn.Module, record: Record) -> list[tuple[nn.Module, Callable]]:
    """``(module, forward hook)`` pairs that measure ``net``'s activations, each hook handing
    ``record(tag, 0-d tensor)`` what it measured, under ``<group>/<quantity>`` tags:

        act_mean, act_std   the output of each residual block (the residual stream after it)
        tanh_sat            share of an Elman layer's states h past +-0.97 (TANH_EDGE)
        gelu_zero           share of GELU outputs stuck near zero on the flat side (input < -3)
        attn_entropy        attention entropy per query, nats, averaged over heads and positions
                            (of the batch's first sequences when T is long: ``leading``)
        alpha_entropy       the same for the Backpack's sense weights alpha
    """
    found = []
    for name, module in net.named_modules():
        group = group_of(name)
        if isinstance(module, (Block, ConvBlock)) and re.search(r"(?:^|\.)blocks\.\d+$", name):
            found.append((module, _block_output(group, record)))
        if isinstance(module, CausalSelfAttention):
            found.append((module, _attention(group, record)))
        elif isinstance(module, ElmanLayer):
            found.append((module, _tanh(group, record)))
        elif isinstance(module, MLP):
            found.append((module.c_fc, _gelu_input(group, record)))  # the GELU reads c_fc's output
        if isinstance(module, ConvBlock):
            found.append((module.conv, _gelu_input(group, record)))  # the block's GELU reads the conv's output
        if isinstance(module, Backpack):
            found.append((module.ln_f, _alpha(module, record)))  # alpha is computed from ln_f's output
    return found


def _block_output(group: str, record: Record):
    def hook(module, args, y):
        y = y.detach().float()
        record(f"{group}/act_mean", y.mean())
        record(f"{group}/act_std", y.std())
    return hook


def _tanh(group: str, record: Record):
    def hook(module, args, out):
        record(f"{group}/tanh_sat", share(out[0].detach().abs() > TANH_EDGE))  # out: (all states, last state)
    return hook


def _gelu_input(group: str, record: Record):
    def hook(module, args, pre):
        record(f"{group}/gelu_zero", share(pre.detach() < GELU_FLAT))
    return hook


def _attention(group: str, record: Record):
    def hook(module, args, y):
        with torch.no_grad():  # recomputed from the block's input: no dropout, nothing random drawn
            record(f"{group}/attn_entropy", entropy(module.probabilities(leading(args[0], module.n_head))))
    return hook


def _alpha(backpack: Backpack, record: Record):
    def hook(module, args, h):
        with torch.no_grad():
            record("senses/alpha_entropy", entropy(backpack.alpha(leading(h, backpack.n_senses))))
    return hook


def matrices(net: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The weight matrices (and convolution kernels) of ``net`` by group: what the ratios are of.
    Biases and LayerNorm gains only shift and scale; makemore part 3 leaves them out too."""
    groups = defaultdict(list)
    for name, p in net.named_parameters():
        if p.dim() >= 2 and p.numel() > 1 and p.requires_grad:
            groups[group_of(name)].append((name, p))
    return groups


def log10_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """log10(std(num) / std(den)), in fp32."""
    return torch.log10(num.float().std() / den.float().std())


# ----- when it warns ---------------------------------------------------------------
class Rule(NamedTuple):
    """A healthy range of one quantity (``low`` or ``high`` is None: no bound on that side), and
    what leaving it usually means. ``at_start``: a range for step 0 only, the initialisation."""

    quantity: str
    low: float | None
    high: float | None
    meaning: str
    at_start: bool = False

    def broken_by(self, value: float, step: int) -> bool:
        if self.at_start and step != 0:
            return False
        return (self.high is not None and value > self.high) or (self.low is not None and value < self.low)

    def healthy(self) -> str:
        bound = f"<= {self.high:g}" if self.high is not None else f">= {self.low:g}"
        return ("at the start " if self.at_start else "") + bound


# ----- the callback -----------------------------------------------------------------
class TrainingHealth(L.Callback):
    """Training health per block in TensorBoard, and one line when a value leaves its healthy range.

    Logged under ``health/<block>/<quantity>`` every ``every_n_steps`` optimizer steps (see
    ``probes`` and ``matrices``); the line comes once per kind of problem. Costs nothing on
    the other steps; changes nothing in training. Turn it on with
    ``--trainer.callbacks+=gptnano.train.health.TrainingHealth``.

    The default ranges are makemore part 3's where they hold for gptnano's networks and
    optimizers, and were checked against 1000-step runs of configs/gpt.yaml and rnn.yaml (and
    shorter ones of backpack.yaml and cnn.yaml): none of them is warned about.
    docs/tensorboard.md, "Training health", has the measured values.

    Args:
        every_n_steps: Measure and log every this many optimizer steps (step 0 included).
        max_tanh_sat_at_start: Warn when, at step 0, more than this share of tanh outputs is past
            +-0.97, where under 6 % of the gradient gets through: makemore part 3's check of an
            initialisation (a few percent at most; a network should start where gradients flow).
        max_tanh_sat: Warn above this share at any step. An Elman network learns to saturate
            (configs/rnn.yaml: from 0 to about half its states by step 1000, training well);
            past three quarters, little gradient gets through the recurrence at all.
        max_gelu_zero: Warn above this share of GELU outputs stuck near zero on the flat side
            (input below -3, slope under 0.012): units that pass no gradient, GELU's dead ReLUs
            (configs/gpt.yaml reaches about a fifth by step 1000).
        min_attn_entropy: Warn when a block's mean attention entropy (nats) falls below this:
            every head puts about 95 % on one position, the entropy collapse that comes before
            divergence (Zhai et al. 2023). Uniform attention over 64 positions is 3.2 nats,
            configs/gpt.yaml ends near 1.5. (The Backpack's alpha has no such range: it may rightly
            take a sense from one position, the current token's, and is only logged.)
        min_update_ratio_log10: Warn when log10(std(update) / std(weight)) of a block's matrices
            falls below this: the weights have stopped moving (makemore part 3: around -3 is
            healthy; gptnano's runs stay between -3.2 and -1.3, warmup and decay included).
        max_update_ratio_log10: Warn when it rises above this: each step changes the weights
            by a tenth of their spread or more, a learning rate too high to stay stable.
        max_grad_ratio_log10: Warn when log10(std(gradient) / std(weight)) rises above this
            (gradients before clipping): gradients ten times larger than the weights are exploding.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        max_tanh_sat_at_start: float = 0.10,
        max_tanh_sat: float = 0.75,
        max_gelu_zero: float = 0.50,
        min_attn_entropy: float = 0.30,
        min_update_ratio_log10: float = -5.0,
        max_update_ratio_log10: float = -1.0,
        max_grad_ratio_log10: float = 1.0,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.rules = [  # the meanings are short: the whole line fits in lines.MAX_WIDTH
            Rule("tanh_sat", None, max_tanh_sat_at_start,
                 "saturated tanh passes almost no gradient: initial weights too large", at_start=True),
            Rule("tanh_sat", None, max_tanh_sat,
                 "saturated tanh passes almost no gradient: lower the learning rate"),
            Rule("gelu_zero", None, max_gelu_zero,
                 "GELU units on their flat side learn no more: lower the learning rate or the init scale"),
            Rule("attn_entropy", min_attn_entropy, None,
                 "attention collapsed onto single positions, often before a loss spike: lower the learning rate"),
            Rule("update_ratio_log10", min_update_ratio_log10, None,
                 "the weights barely move: learning rate too low, or vanishing gradients"),
            Rule("update_ratio_log10", None, max_update_ratio_log10,
                 "each step moves the weights by a large share of their size: learning rate too high"),
            Rule("grad_ratio_log10", None, max_grad_ratio_log10,
                 "gradients far larger than the weights: exploding (clipping hides it from the update)"),
        ]
        self._hooks: list = []
        self._step: int | None = None  # the step being measured, or None
        self._stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._before: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        self._warned: set[Rule] = set()
        self._compiled_said = False

    def _record(self, tag: str, value: torch.Tensor) -> None:
        self._stats[tag].append(value.detach())

    # ----- hooks: on the measured steps only ----------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        first_micro_batch = batch_idx % max(1, trainer.accumulate_grad_batches) == 0
        if self._step is not None or not first_micro_batch or trainer.global_step % self.every_n_steps:
            return
        self._step = trainer.global_step
        if _compiled(pl_module):
            # Hooks appearing and disappearing would recompile the model every time they change.
            if not self._compiled_said and trainer.is_global_zero:
                lines.say("training health: activations are not probed under --model.compile true "
                          "(hooks would recompile the model); gradient and update ratios are")
            self._compiled_said = True
            return
        self._hooks = [module.register_forward_hook(hook) for module, hook in probes(pl_module.net, self._record)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Gradients are complete here (and unscaled under fp16 mixed precision), not yet clipped.
        if self._step is None:
            return
        with torch.no_grad():
            for group, params in matrices(pl_module.net).items():
                for name, p in params:
                    if p.grad is None:
                        continue
                    self._record(f"{group}/grad_ratio_log10", log10_ratio(p.grad, p))
                    self._before.append((group, p, p.detach().clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._step is None or not update_ended(trainer, batch_idx):
            return
        self._remove_hooks()
        with torch.no_grad():
            for group, p, before in self._before:
                self._record(f"{group}/update_ratio_log10", log10_ratio(p.detach() - before, before))
        values = self._values()
        step, self._step, self._before = self._step, None, []
        self._stats.clear()
        if values:
            for logger in trainer.loggers:
                logger.log_metrics({f"health/{tag}": v for tag, v in values.items()}, step=step)
            if trainer.is_global_zero:
                self.warn(values, step)

    def _values(self) -> dict[str, float]:
        """Each tag's measurements averaged (over micro-batches, and over the matrices or modules of
        a group), read back to the host at once; values that are not finite are left out."""
        if not self._stats:
            return {}
        tags = sorted(self._stats)
        means = torch.stack([torch.stack(self._stats[t]).float().nanmean() for t in tags]).tolist()
        return {t: v for t, v in zip(tags, means) if math.isfinite(v)}

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()
        self._step, self._before = None, []
        self._stats.clear()

    def on_train_end(self, trainer, pl_module) -> None:
        self.on_exception(trainer, pl_module, None)

    # ----- the warning ----------------------------------------------------------------
    def warn(self, values: dict[str, float], step: int) -> None:
        """One line per rule, the first time any group breaks it: the worst group, its value, the
        healthy range, and what it usually means."""
        for rule in self.rules:
            bad = {tag.split("/")[0]: v for tag, v in values.items()
                   if tag.endswith("/" + rule.quantity) and rule.broken_by(v, step)}
            if not bad or rule in self._warned:
                continue
            self._warned.add(rule)
            worst = (max if rule.high is not None else min)(bad, key=bad.get)
            others = sorted(set(bad) - {worst})
            also = "; also " + ", ".join(others[:3]) + (f" +{len(others) - 3}" if len(others) > 3 else "") if others else ""
            lines.say(f"training health, step {step}: {worst} {rule.quantity} {bad[worst]:.3g} "
                      f"(healthy {rule.healthy()}{also})", rule.meaning)


def _compiled(pl_module) -> bool:
    hparams = getattr(pl_module, "hparams", None) or {}
    return bool(hparams.get("compile"))
