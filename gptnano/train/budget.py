"""A fit that ends by itself within a wall-clock budget counted from its launch, with a
learning-rate schedule that ends where the run ends.

Lightning's ``max_time`` stops a run when its time is up, wherever its schedule is: the
learning rate is still high and the last validation never comes. ``TimeBudget`` instead
times the run's own first steps (and its sanity validation), then plans the rest in
optimizer steps, as `gptnano compare` plans its time budgets from a probe: ``max_steps``
becomes the planned count, the schedule decays over it (LitLM reads ``trainer.max_steps``),
and validations fall evenly with the last at the last step. The plan is saved in
checkpoints, so a resumed run keeps it. configs/gpt-5min.yaml uses it; `gptnano compare` gives
it to every run of a wall-time budget, counting training time only (``clock="training"``).
"""

import math
import os
import sys
import time
from pathlib import Path
from typing import Literal

import lightning as L

from gptnano import lines
from gptnano.errors import UserError
from gptnano.train.callbacks import update_ended

_IMPORTED = time.time()  # the fallback for launch: this module is imported early in `gptnano fit`


def seconds_since_launch() -> float:
    """Wall seconds since this process started: its start time on Linux (/proc), else since gptnano's
    training code was imported (a fraction of a second after launch, the interpreter's own start)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time() - _IMPORTED


def plan(step: int, step_s: float, validation_s: float, seconds_left: float, validations: int,
         validated: bool = True) -> tuple[int, int]:
    """The run's last step and the steps between validations: as many steps after ``step`` (the steps
    already taken) as ``seconds_left`` holds at ``step_s`` seconds a step, together with the
    validations still to come (of ``validation_s`` seconds each; those before ``step`` are done, and
    one at ``step`` too if ``validated``), the last step a multiple of ``validations`` (the last
    validation at the last step). Right after a validation (``validated``), a spacing whose next
    validation would come less than half a spacing after ``step`` is passed over: it would cost a
    whole validation for a few steps.

    Returns:
        (planned last step, optimizer steps between validations).
    """
    step_s = max(step_s, 1e-9)

    def cost(every: int) -> float:  # seconds from ``step`` to the end of the run validated every ``every``
        done = step // every if validated else (step - 1) // every
        return (every * validations - step) * step_s + (validations - done) * validation_s

    def too_soon(every: int) -> bool:  # right after a validation, the next one within half a spacing
        return validated and step > 0 and 0 < every - step % every < every / 2

    every = max(1, math.floor((step + max(0.0, seconds_left) / step_s) / validations))  # no validation cost yet
    while every > 1 and every * validations > step and (cost(every) > seconds_left or too_soon(every)):
        every -= 1
    if every * validations <= step:  # the budget is spent already: stop at the next validation point
        every = max(1, math.ceil((step + 1) / validations))
    return every * validations, every


def replan_step(probe_end: int, planned: int, every: int, probe_steps: int) -> int:
    """The step at which the plan is made once more, from the pace since the probe: a fifth of the
    way through the planned steps, before the first validation (so that none falls inside the timed
    stretch), and at least ``probe_steps`` after the probe. The first steps of a run are slower than
    its steady pace (a 30-step probe was seen 20 % slow on a 2-core CPU), so a plan from them alone
    leaves part of the budget unused. Returns ``planned + 1`` (never) where no such step exists."""
    step = min(planned // 5, every - 1)
    return step if step >= probe_end + probe_steps else planned + 1


class TimeBudget(L.Callback):
    """Plan a fit's steps so that it ends, last validation included, within ``minutes`` of its launch
    (or of training: ``clock``).

    The run trains ``probe_steps`` optimizer steps as configured (keep the learning-rate warmup at least
    that long), then one line says the plan (made once more, from the steadier pace since, a fifth of
    the way in: ``replan_step``): e.g. ``gptnano: time budget 5m00s: 1,480 steps from 0.18 s a
    step, validations every 370 steps (3.1 s each), ending about 4m51s after launch``. From then on
    ``trainer.max_steps`` is the planned step and ``val_check_interval`` the planned spacing; the
    learning-rate schedule decays over the planned steps (unless ``--model.lr_decay_steps`` is given).
    After each validation the plan is checked against the pace since the last one and the validation's
    own time, and the run planned shorter when it is behind, longer when it is well ahead (``_check``).

    Args:
        minutes: The run's wall time. With ``clock="launch"``, from the command's launch: imports, data,
            every validation and the last checkpoint included.
        clock: What the budget counts. "launch": the whole command, from the process's start.
            "training": the time inside Lightning's training loop, validations included (what
            Lightning's ``Timer`` calls "train"; the sanity check and start-up left out), summed over
            a run and its resumes; `gptnano compare`'s wall-time budgets count this.
        validations: Validations in the run; the last one is at its last step.
        probe_steps: Optimizer steps timed before planning (the first two, which warm up, are left out).
        margin: Share of the budget kept back for what the plan cannot see (the last checkpoint, the
            end-of-run line, a slower stretch).

    Raises:
        UserError: settings it cannot plan with (validation counted in epochs; too few probe steps; a clock
            other than "launch" or "training").
    """

    TOLERANCE = 0.03  # a validation that finds the run this share of its steps off its plan plans it again
    MIN_PACE_STEPS = 10  # the fewest steps between validations whose pace a new plan is made from

    def __init__(self, minutes: float = 5.0, validations: int = 4, probe_steps: int = 30, margin: float = 0.05,
                 clock: Literal["launch", "training"] = "launch"):
        if minutes <= 0 or validations < 1 or probe_steps < 4 or not 0 <= margin < 1:
            raise UserError("TimeBudget needs minutes > 0, validations >= 1, probe_steps >= 4 and 0 <= margin < 1")
        if clock not in ("launch", "training"):
            raise UserError(f"TimeBudget's clock is 'launch' or 'training', got {clock!r}")
        self.minutes, self.validations, self.probe_steps, self.margin = minutes, validations, probe_steps, margin
        self.clock = clock
        self.planned: int | None = None
        self.every: int | None = None
        self._trained_before = 0.0  # training clock: seconds trained before this process (a resumed run)
        self._train_start: float | None = None
        self._first_step = 0  # the step this process started from (a resumed run's is its checkpoint's)
        self._start: float | None = None  # when the probe began (two warm-up steps after the first)
        self._validation_batch_s: float | None = None
        self._probe_end: tuple[int, float] | None = None  # (step, time) of the first plan, for the one re-plan
        # (step, time) the pace is measured from: the probe's end (or a resume), then the first step after each
        # validation (one inside the probe sets it first); a re-plan a fifth of the way in keeps the longer stretch
        self._since: tuple[int, float] | None = None
        self._pace: float | None = None  # seconds a step since then
        self._validation_start = 0.0
        self._validated_s = 0.0  # seconds of validation since training began (left out of the probe's pace)
        self._validation_s: float | None = None  # the last validation's seconds, what follows it included
        self._validating = False  # a validation ended, and training has not started again
        self._pace_steps = 0

    def state_dict(self) -> dict:
        state = {"planned": self.planned, "every": self.every}
        return state if self.clock == "launch" else {**state, "trained_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned, self.every = state_dict.get("planned"), state_dict.get("every")
        self._trained_before = float(state_dict.get("trained_s") or 0.0)

    def elapsed(self) -> float:
        """Seconds of the budget spent: since launch, or (training clock) inside the training loop."""
        if self.clock == "launch":
            return seconds_since_launch()
        return self._trained_before + (0.0 if self._train_start is None else time.perf_counter() - self._train_start)

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.check_val_every_n_epoch is not None:
            raise UserError("TimeBudget plans validations in optimizer steps: give --trainer.check_val_every_n_epoch "
                            "null")

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._sanity = time.perf_counter()

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        batches = sum(trainer.num_sanity_val_batches) or 1
        self._validation_batch_s = (time.perf_counter() - self._sanity) / batches

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.perf_counter()
        self._first_step = trainer.global_step  # 0, or where a resumed run goes on from
        if self.planned is not None:  # a resumed run keeps its plan, and its first validation checks it
            self._apply(trainer, pl_module)
            self._since = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not update_ended(trainer, batch_idx):
            return
        step = trainer.global_step
        if self.planned is not None:
            if self._probe_end is not None and step >= replan_step(self._probe_end[0], self.planned, self.every,
                                                                   self.probe_steps):
                first, began = self._probe_end
                self._probe_end = None
                self._plan(trainer, pl_module, step, (time.perf_counter() - began) / (step - first), "re-planned",
                           validated=False)
            return
        # the probe: from the third step this process takes (a run resumed before its plan probes again)
        if step == self._first_step + 2:
            self._start = time.perf_counter() - self._validated_s  # validations from here on are left out below
        elif step >= self._first_step + self.probe_steps and self._start is not None:
            trained = time.perf_counter() - self._start - self._validated_s
            self._plan(trainer, pl_module, step, trained / (step - self._first_step - 2), "", validated=False)
            self._probe_end = (step, time.perf_counter())

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self._since is not None and trainer.global_step > self._since[0]:
            self._pace = (time.perf_counter() - self._since[1]) / (trainer.global_step - self._since[0])
            self._pace_steps = trainer.global_step - self._since[0]
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validating = True  # until the next training batch: the checkpoint and text sample count too
            self._probe_end = None  # from here on the validations check the plan (the re-plan would span this one)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """After a validation, what it cost (the pass, and the checkpoints and text sample that follow
        it: ~0.7 s on a 2-core CPU, which counted as training made a short interval's steps look 3x
        dearer) and a check of the plan against the pace since the last one (``_check``)."""
        if not self._validating:
            return
        self._validating = False
        now = time.perf_counter()
        self._validation_s = now - self._validation_start
        self._validated_s += self._validation_s
        self._check(trainer, pl_module, trainer.global_step)
        self._since = (trainer.global_step, time.perf_counter())

    def _check(self, trainer, pl_module, step: int) -> None:
        """The plan against the pace since the last validation and the time validations really take
        (the first plan's, from the sanity check, was seen 50 % dear): a run more than ``TOLERANCE``
        of its steps behind (a machine that slowed down) is planned shorter; one as far ahead (a plan
        from a slow stretch, dear validations), longer, while a validation is still to come to correct
        it. A pace over fewer than ``MIN_PACE_STEPS`` steps is too noisy to plan from."""
        if self.planned is None or self._pace is None or step >= self.planned or self._pace_steps < self.MIN_PACE_STEPS:
            return
        left = self.minutes * 60 * (1 - self.margin) - self.elapsed()
        planned, every = plan(step, self._pace, self._validation_s, left, self.validations)
        behind = planned < self.planned * (1 - self.TOLERANCE)
        ahead = planned > self.planned * (1 + self.TOLERANCE) and step + every < planned  # a validation left
        # rank 0's verdict and plan, so that all processes take it or none
        behind, ahead, planned, every = trainer.strategy.broadcast((behind, ahead, planned, every))
        if behind or ahead:
            self._take(trainer, pl_module, step, planned, every, self._pace, self._validation_s,
                       "behind the plan" if behind else "ahead of the plan")

    def _plan(self, trainer, pl_module, step: int, step_s: float, again: str, validated: bool) -> None:
        batches = sum(trainer.num_val_batches) if trainer.num_val_batches else 0
        validation_s = self._validation_s or (self._validation_batch_s or step_s) * batches
        left = self.minutes * 60 * (1 - self.margin) - self.elapsed()
        # one plan for every process (each timed its own steps): rank 0's, or the ranks would stop apart
        planned, every = trainer.strategy.broadcast(plan(step, step_s, validation_s, left, self.validations,
                                                         validated=validated))
        self._take(trainer, pl_module, step, planned, every, step_s, validation_s, again)
        if self._since is None:  # the probe's plan: the pace is measured from here to the first validation
            self._since = (step, time.perf_counter())

    def _take(self, trainer, pl_module, step, planned, every, step_s, validation_s, again: str) -> None:
        self.planned, self.every = planned, every
        self._apply(trainer, pl_module)
        if trainer.is_global_zero:
            end = self.elapsed() + (planned - step) * step_s + (self.validations - step // every) * validation_s
            lines.say(f"time budget {lines.duration(self.minutes * 60)}" + (f", {again} at step {step:,}" if again else "")
                      + f": {self.planned:,} steps from {step_s:.3g} s a step", f"validations every {self.every:,} "
                      f"steps ({validation_s:.2g} s each)",
                      f"ending about {lines.duration(end)} after {'launch' if self.clock == 'launch' else 'training began'}",
                      file=sys.stderr)

    def _apply(self, trainer, pl_module) -> None:
        """The plan into the Trainer and the schedule: max_steps, the validation spacing (in batches, as
        Lightning counts it), and the learning rate's decay over the planned steps."""
        trainer.fit_loop.epoch_loop.max_steps = self.planned  # what trainer.max_steps reads
        trainer.val_check_interval = trainer.val_check_batch = self.every * trainer.accumulate_grad_batches
        optimizers, schedules = trainer.optimizers, trainer.lr_scheduler_configs
        if optimizers and schedules and hasattr(pl_module, "apply_optimizer_settings"):
            pl_module.apply_optimizer_settings(optimizers[0], schedules[0].scheduler)
