"""Budgets of `gptnano compare`: how much training a run gets, and how a budget becomes the
run's steps, validation interval, warmup and learning-rate decay.

A budget is optimizer steps (``2000steps``), training tokens (``20Mtok``), model FLOPs
(``5e13flop``: tokens x the architecture's ``flops_per_token()``) or wall time (``5min``).
The first three mean the same on every machine. Wall time is fitted to this machine from
a short probe of real training steps (``gptnano.hardware.time_steps`` over
``gptnano.train.steps.training_step``), validations included, so it is the one
machine-dependent kind. No Lightning here; torch only inside the probe.
"""

import dataclasses
import math
import re

from gptnano.errors import UserError
from gptnano.numbers import PREFIXES, median

UNITS = {  # unit as typed (lower case) -> (kind, factor to the kind's unit)
    "step": ("steps", 1.0), "steps": ("steps", 1.0),
    "tok": ("tokens", 1.0), "toks": ("tokens", 1.0), "token": ("tokens", 1.0), "tokens": ("tokens", 1.0),
    "flop": ("flops", 1.0), "flops": ("flops", 1.0),
    "s": ("seconds", 1.0), "sec": ("seconds", 1.0), "min": ("seconds", 60.0), "h": ("seconds", 3600.0),
}
EXAMPLES = "optimizer steps (2000steps), training tokens (20Mtok), model FLOPs (5e13flop) or wall time (300s, 5min, 1h)"
STEPS_TOLERANCE = 0.002  # a run's steps may miss its budget by this share (at least one step) to validate evenly
MAX_WARMUP_FRACTION = 0.1  # a run spends at most this share of its steps warming up
SAMPLE_TOKENS = 200  # the text sample TextSample generates at every validation (gptnano/train/callbacks.py)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every run of a comparison gets: ``amount`` optimizer steps, tokens, FLOPs or seconds."""

    kind: str  # "steps", "tokens", "flops" or "seconds"
    amount: float
    text: str  # as the user typed it

    @property
    def machine_dependent(self) -> bool:
        return self.kind == "seconds"

    def describe(self) -> str:
        """``2000 optimizer steps``, ``2.00e+13 model FLOPs`` ... for a table's caption."""
        if self.kind == "steps":
            return f"{self.amount:.0f} optimizer steps per run"
        if self.kind == "tokens":
            return f"{self.amount:.3g} training tokens per run"
        if self.kind == "flops":
            return f"{self.amount:.3g} model FLOPs per run (tokens x each architecture's flops_per_token)"
        return f"{self.amount:.0f} s of training per run (wall time, validations included: machine-dependent)"


def parse_budget(text: str) -> Budget:
    """``2000steps``, ``20Mtok``, ``5e13flop``, ``300s``, ``5min``, ``1.5h`` -> Budget (k, M, G, T, P prefixes)."""
    prefix = "[" + "".join(PREFIXES) + "]?"
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*(" + prefix + r")([A-Za-z]+)\s*", text or "")
    unit = UNITS.get(m.group(4).lower()) if m else None
    if unit is None:
        raise UserError(f"bad --budget {text!r}: give {EXAMPLES}")
    kind, factor = unit
    amount = float(m.group(1)) * 10 ** int(m.group(2) or 0) * PREFIXES.get(m.group(3), 1.0) * factor
    if not math.isfinite(amount) or amount <= 0:
        raise UserError(f"bad --budget {text!r}: it must be a positive amount of {EXAMPLES}")
    if kind == "steps" and amount != round(amount):
        raise UserError(f"bad --budget {text!r}: optimizer steps come whole")
    return Budget(kind, amount, text.strip())


@dataclasses.dataclass
class Plan:
    """One run's schedule. ``steps`` is a multiple of ``val_every``, so the last step is a
    validation and the final validation loss is that of the finished schedule."""

    steps: int
    val_every: int  # optimizer steps between validations
    warmup: int  # steps of linear warmup; the cosine decay ends at ``steps``
    tokens_per_step: int
    flops_per_token: float
    predicted_s: float | None = None  # wall time the probe predicts (wall-time budgets)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def validations(self) -> int:
        return self.steps // self.val_every


def validation_grid(target: float, validations: int) -> tuple[int, int]:
    """(steps, val_every) for a run of about ``target`` steps validated about ``validations``
    times: steps a multiple of val_every (so the last step validates), between half and twice
    that many validations. Among the intervals that put the steps within STEPS_TOLERANCE of
    ``target`` (or else as close as any can), the one closest to target / validations.
    A run of at most ``validations`` steps validates at every step."""
    target = max(1.0, target)
    if target <= validations:
        return max(1, round(target)), 1
    lo = max(1, math.floor(target / (2 * validations)))
    hi = max(lo, math.ceil(2 * target / validations))
    tolerance = max(1.0, STEPS_TOLERANCE * target)
    best = None
    for every in range(lo, hi + 1):
        steps = max(every, round(target / every) * every)
        off = abs(steps - target)
        key = (off > tolerance, off if off > tolerance else 0, abs(every - target / validations), off)
        if best is None or key < best[0]:
            best = (key, steps, every)
    return best[1], best[2]


def warmup_for(steps: int, configured: int) -> int:
    """The config's warmup (tuned for the optimizer's start, a number of steps, not a share
    of the run), but at most MAX_WARMUP_FRACTION of the run, so a short run still spends
    most of its steps at full and decaying learning rate."""
    return max(0, min(configured, int(MAX_WARMUP_FRACTION * steps)))


def target_steps(budget: Budget, tokens_per_step: int, flops_per_token: float) -> float:
    """Optimizer steps a steps, tokens or FLOPs budget buys (wall time: see ``fit_to_time``)."""
    if budget.kind == "steps":
        return budget.amount
    if budget.kind == "tokens":
        return budget.amount / tokens_per_step
    if budget.kind == "flops":
        return budget.amount / (tokens_per_step * flops_per_token)
    raise ValueError("a wall-time budget is fitted with fit_to_time")


def plan(budget: Budget, *, tokens_per_step: int, flops_per_token: float, warmup: int, validations: int,
         label: str) -> Plan:
    """The schedule of a steps, tokens or FLOPs budget; less than one step is a UserError."""
    target = target_steps(budget, tokens_per_step, flops_per_token)
    if target < 0.5:
        per_step = f"{tokens_per_step} tokens, {tokens_per_step * flops_per_token:.3g} FLOPs per step"
        raise UserError(f"--budget {budget.text} is less than one optimizer step of {label} ({per_step})")
    steps, every = validation_grid(target, validations)
    return Plan(steps, every, warmup_for(steps, warmup), tokens_per_step, flops_per_token)


@dataclasses.dataclass
class Probe:
    """Seconds this machine takes for one training step and one validation pass of a run."""

    step_s: float
    validation_s: float  # the full pass, plus the text sample generated after it


def fit_to_time(budget: Budget, probe: Probe, *, tokens_per_step: int, flops_per_token: float, warmup: int,
                validations: int, slowdown: float = 1.0, label: str = "") -> Plan:
    """The schedule that fills a wall-time budget: steps x step time + validations x
    validation time = budget / ``slowdown`` (the ratio of real to predicted time of the runs
    already done in this comparison: Lightning's own overhead, checkpoints, a busy machine)."""
    seconds = budget.amount / slowdown
    n_val = validations
    for _ in range(4):  # the number of validations depends on the steps: a few rounds settle it
        target = (seconds - n_val * probe.validation_s) / probe.step_s
        if target < 1:
            raise UserError(f"--budget {budget.text} is too short for {label}: one step takes {probe.step_s:.3g} s "
                            f"and each of ~{n_val} validations {probe.validation_s:.3g} s (fewer with --validations)")
        steps, every = validation_grid(target, validations)
        n_val = steps // every
    predicted = (steps * probe.step_s + n_val * probe.validation_s) * slowdown
    return Plan(steps, every, warmup_for(steps, warmup), tokens_per_step, flops_per_token, predicted_s=predicted)


def probe_run(net_spec: dict, settings: dict, *, device: str, precision: str, batch_size: int, block_size: int,
              eval_batch_size: int, eval_batches: int, seconds: float = 3.0) -> Probe:
    """Time real steps of one run before it starts: LitLM's training step (same network,
    optimizer, precision and batch shape; random tokens, which cost what real ones do), a
    validation batch, and the text sample that follows each validation."""
    import torch

    from gptnano.checkpoint import build_net
    from gptnano.hardware import fast_dtype, time_steps
    from gptnano.sampling import generate
    from gptnano.train.steps import autocast_for, training_step

    device_type = torch.device(device).type
    sync = torch.cuda.synchronize if device_type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    net = build_net(net_spec)
    ids = torch.randint(net.vocab_size, (batch_size, block_size + 1), generator=g)
    muon = settings.get("muon_dtype", "auto")
    ns_dtype = fast_dtype(device_type) if muon == "auto" else getattr(torch, muon)
    step = training_step(net, settings, device=device, precision=precision, batch=(ids[:, :-1], ids[:, 1:]),
                         ns_dtype=ns_dtype)
    step_s = time_steps(step, sync=sync, warmup=2, min_steps=5, max_steps=200, seconds=seconds)
    net.eval()
    val_ids = torch.randint(net.vocab_size, (eval_batch_size, block_size), generator=g).to(device)

    @torch.no_grad()
    def evaluate():
        with autocast_for(precision, device_type):
            net(val_ids)

    eval_s = time_steps(evaluate, sync=sync, warmup=1, min_steps=2, max_steps=10, seconds=seconds / 4)
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    # A cached sample costs the same per token: time a tenth of it, a few times.
    sample_s = time_steps(lambda: generate(net, prompt, SAMPLE_TOKENS // 10), sync=sync, warmup=1, min_steps=2,
                          max_steps=5, seconds=seconds / 10)
    return Probe(median(step_s), eval_batches * median(eval_s) + 10 * median(sample_s))
