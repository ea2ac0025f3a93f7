"""What `gptnano compare` reads from its runs and makes of them: each run's final validation
loss and curve, each entry's mean and spread over seeds, and a ranking that says when two
entries cannot be told apart (written out by gptnano/compare/outputs.py).

A run's numbers come from its TensorBoard events (validation losses at their optimizer
steps, training tok/s and MFU) and its last.ckpt (training time, by Lightning's ``Timer``,
which a resumed run carries on). No Lightning here.
"""

import math
import statistics
from pathlib import Path

from gptnano.errors import UserError
from gptnano.logs import read_run, versions
from gptnano.numbers import median

LN2 = math.log(2)


# ----- one run ---------------------------------------------------------------------------
def read_versions(folder: Path) -> list[dict]:
    """The scalars of each version that logged a validation (``gptnano.logs.read_run``'s form)."""
    runs = []
    for version in versions(folder):
        try:
            runs.append(read_run(version))
        except UserError:
            continue  # stopped before its first validation: nothing of it is kept
    return runs


def curve(runs: list[dict], train_s: float, steps: int) -> list[tuple[int, float, float]]:
    """(step, seconds of training, validation loss) of a run, one point per validation.

    A resumed run logs into a new version, and retrains the steps after its last
    checkpoint: points of an earlier version from the later version's first validation on
    were superseded and are dropped. Time is counted back from the end of training
    (``train_s``, Lightning's Timer, which leaves out start-up and the time between a stop
    and its resume); points before a resume are placed by the run's mean time per step."""
    kept = []  # per version: [(wall time, step, loss)]
    for i, run in enumerate(runs):
        val = run["series"]["val/loss"]
        if i + 1 < len(runs):
            cut = runs[i + 1]["series"]["val/loss"][0][1]
            val = [p for p in val if p[1] < cut]
        kept.append(val)
    per_step = train_s / max(1, steps)
    points, end, end_step = [], train_s, None
    for val in reversed(kept):
        if not val:
            continue
        if end_step is not None:
            end -= (end_step - val[-1][1]) * per_step
        t_last = val[-1][0]
        points = [(s, max(0.0, end - (t_last - t)), v) for t, s, v in val] + points
        end, end_step = points[0][1], points[0][0]
    return points


def median_of(runs: list[dict], tag: str) -> float | None:
    values = [v for run in runs for _, _, v in run["series"].get(tag, [])]
    return median(values) if values else None


def planned_steps(ckpt: dict, steps: int) -> int:
    """The last step a run's checkpoint plans: its TimeBudget's plan (a wall-time run plans its own),
    else ``steps``, the plan it was launched with."""
    callbacks = ckpt.get("callbacks") or {}
    replanned = [state.get("planned") for key, state in callbacks.items() if key.startswith("TimeBudget")]
    return int(replanned[0]) if replanned and replanned[0] else steps


def read_result(logs: Path, last_ckpt: Path, steps: int) -> dict:
    """A finished run's numbers, or a UserError saying why it is not finished. ``steps`` is the run's
    planned last step, unless its TimeBudget (a wall-time budget) planned it again during the run:
    then the last plan, saved in its checkpoint, is the step it must have validated at."""
    from gptnano.checkpoint import read_checkpoint

    runs = read_versions(logs)
    ckpt = read_checkpoint(last_ckpt)
    steps = planned_steps(ckpt, steps)
    timer = (ckpt.get("callbacks") or {}).get("Timer") or {}
    train_s = float((timer.get("time_elapsed") or {}).get("train", math.nan))
    points = curve(runs, train_s, steps) if runs else []
    final = [v for s, _, v in points if s == steps]
    if not final:
        reached = max((s for s, _, _ in points), default=0)
        raise UserError(f"{logs.name} has no validation at its last step {steps} (its last was at step {reached}): "
                        "the run did not finish its schedule")
    return {"final_val_loss": final[-1], "best_val_loss": min(v for _, _, v in points), "steps": steps,
            "global_step": int(ckpt.get("global_step", -1)), "train_s": train_s,
            "tok_s": median_of(runs, "perf/tok_s"), "mfu": median_of(runs, "perf/mfu"),
            "curve": [[s, round(t, 3), v] for s, t, v in points]}


def real_over_predicted(record: dict) -> float:
    """A finished wall-time run's real training time over what its probe alone (no slowdown
    correction) prices the steps and validations the run really made at. The run plans its steps
    again from its own pace (TimeBudget), so its whole time against compare's first plan says
    nothing of the probe's error; the same steps and validations at the probe's rates do. A record
    without its probe or its curve is compared per step with its plan's prediction."""
    plan, result = record["plan"], record["result"]
    steps, pace = result.get("steps", plan["steps"]), record.get("pace") or {}
    if pace and result.get("curve"):
        probe = pace["probe"]
        return result["train_s"] / (steps * probe["step_s"] + len(result["curve"]) * probe["validation_s"])
    # the plan's prediction carries the slowdown it used: taken out, to compare with the probe alone
    return (result["train_s"] / steps) / (plan["predicted_s"] / plan["steps"]) * pace.get("slowdown", 1.0)


# ----- over seeds ------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (None for one value), min, max and n."""
    n = len(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if n > 1 else None,
            "min": min(values), "max": max(values), "n": n}


def entry_stats(runs: list[dict]) -> dict:
    """One entry (a config at a grid point) over its seeds; ``runs`` are finished run records."""
    results = [r["result"] for r in runs]
    final = [x["final_val_loss"] for x in results]

    def mean_of(key: str) -> float | None:
        known = [x[key] for x in results if x.get(key) is not None and math.isfinite(x[key])]
        return statistics.fmean(known) if known else None

    plan = runs[0]["plan"]
    steps = [r["result"].get("steps", r["plan"]["steps"]) for r in runs]  # a wall-time run plans its own
    return {
        "final_val_loss": spread(final),
        "bpc": spread([v / LN2 for v in final]),
        "best_val_loss": spread([x["best_val_loss"] for x in results]),
        "seeds": [r["seed"] for r in runs],
        "params": runs[0]["facts"]["params"],
        "steps": statistics.fmean(steps),
        "tokens": statistics.fmean(steps) * plan["tokens_per_step"],
        "flops": statistics.fmean(steps) * plan["tokens_per_step"] * plan["flops_per_token"],
        "train_s": mean_of("train_s"),
        "tok_s": mean_of("tok_s"),
        "mfu": mean_of("mfu"),
    }


def distinguishable(a: dict, b: dict) -> tuple[bool, float | None]:
    """Whether two entries' mean final losses differ by at least two standard errors of the
    difference, sqrt(s_a^2 / n_a + s_b^2 / n_b); and that standard error (None with one seed,
    where there is no spread to judge by: never distinguishable)."""
    fa, fb = a["final_val_loss"], b["final_val_loss"]
    if fa["std"] is None or fb["std"] is None:
        return False, None
    se = math.sqrt(fa["std"] ** 2 / fa["n"] + fb["std"] ** 2 / fb["n"])
    return abs(fa["mean"] - fb["mean"]) >= 2 * se, se


def ranking(entries: dict[str, dict]) -> list[tuple[str, dict, str]]:
    """Entries by mean final validation loss, each with how it compares with the one above."""
    order = sorted(entries.items(), key=lambda kv: kv[1]["final_val_loss"]["mean"])
    ranked = []
    for i, (label, e) in enumerate(order):
        if i == 0:
            verdict = ""
        else:
            above = order[i - 1][1]
            apart, se = distinguishable(above, e)
            diff = e["final_val_loss"]["mean"] - above["final_val_loss"]["mean"]
            n = min(e["final_val_loss"]["n"], above["final_val_loss"]["n"])
            if se is None:
                verdict = f"+{diff:.4f}, not distinguishable at {n} seed{'s' * (n > 1)} (no spread to judge by)"
            elif apart:
                verdict = f"+{diff:.4f} ({diff / se:.1f} SE)" if se > 0 else f"+{diff:.4f}"
            else:
                verdict = f"+{diff:.4f}, not distinguishable at {n} seeds (< 2 SE = {2 * se:.4f})"
        ranked.append((label, e, verdict))
    return ranked


# ----- trends over a grid ----------------------------------------------------------------
def size_keys(entries: dict[str, dict]) -> list[str]:
    """The grid keys that change an entry's size: two entries of one config that differ in such a
    key alone have different parameter counts (``model.net.n_embd``; not ``model.learning_rate``)."""
    keys = sorted({k for e in entries.values() for k in e.get("grid", {})})
    found = []
    for key in keys:
        if not all(_numeric(e["grid"][key]) for e in entries.values() if key in e.get("grid", {})):
            continue  # a switch (model.net.rope=true drops the position table): a variant, not a size
        params: dict[tuple, set] = {}
        for e in entries.values():
            others = tuple(sorted((k, v) for k, v in e.get("grid", {}).items() if k != key))
            params.setdefault((e.get("config"), others), set()).add(e["params"])
        if any(len(p) > 1 for p in params.values()):
            found.append(key)
    return found


def _numeric(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def iso_budget(entries: dict[str, dict]) -> list[dict]:
    """Loss against size at one budget (an iso-budget curve): per config, and per value of the grid
    keys that do not change the size, its entries that differ in size, smallest first, where there
    are at least two sizes. Each curve: ``{"config", "fixed": {key: value}, "points": [{"entry",
    "params", "flops", "final_val_loss"}]}`` (``flops``: a run's training FLOPs, which differ
    between sizes under a steps or tokens budget)."""
    sizes = size_keys(entries)
    groups: dict[tuple, list] = {}
    for label, e in entries.items():
        fixed = tuple(sorted((k, v) for k, v in e.get("grid", {}).items() if k not in sizes))
        groups.setdefault((e.get("config"), fixed), []).append((label, e))
    curves = []
    for (config, fixed), members in groups.items():
        if len({e["params"] for _, e in members}) < 2:
            continue
        members.sort(key=lambda m: (m[1]["params"], m[1]["flops"]))
        curves.append({"config": config, "fixed": dict(fixed), "points": [
            {"entry": label, "params": e["params"], "flops": e["flops"], "final_val_loss": e["final_val_loss"]}
            for label, e in members]})
    return curves


def differ_in_flops(entries: dict[str, dict], tolerance: float = 0.1) -> bool:
    """Whether the entries' training FLOPs differ by more than ``tolerance`` (a steps or tokens budget
    over entries of different sizes, or architectures of different FLOPs per token). A FLOP budget
    rounds each run to whole steps, a few percent off for a large model that gets few steps (38
    steps of an 8M-parameter Backpack at 3e12 FLOPs came to 3.05e12): that is one budget, not a
    FLOP axis to plot."""
    flops = [e["flops"] for e in entries.values() if e.get("flops")]
    return len(flops) > 1 and max(flops) > (1 + tolerance) * min(flops)
