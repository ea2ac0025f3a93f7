"""What `gptnano compare` reads from its runs and reports: each run's final validation loss
and curve, each entry's mean and spread over seeds, a ranking that says when two entries
cannot be told apart, and the three outputs (results.md, results.json, results.png).

A run's numbers come from its TensorBoard events (validation losses at their optimizer
steps, training tok/s and MFU) and its last.ckpt (training time, by Lightning's ``Timer``,
which a resumed run carries on). No Lightning here.
"""

import json
import math
import re
import statistics
from pathlib import Path

from gptnano.errors import UserError
from gptnano.files import atomic_write

LN2 = math.log(2)


# ----- one run ---------------------------------------------------------------------------
def versions(folder: Path) -> list[Path]:
    """The version_N folders of a run's logs in the order they were written (a resumed run has several)."""
    found = [p for p in folder.glob("version_*") if p.is_dir() and p.name[8:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[8:]))


def read_versions(folder: Path) -> list[dict]:
    """The scalars of each version that logged a validation (``gptnano.cli.plot.read_run``'s form)."""
    from gptnano.cli.plot import read_run

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
    values = sorted(v for run in runs for _, _, v in run["series"].get(tag, []))
    return values[len(values) // 2] if values else None


def read_result(logs: Path, last_ckpt: Path, steps: int) -> dict:
    """A finished run's numbers, or a UserError saying why it is not finished."""
    from gptnano.checkpoint import read_checkpoint

    runs = read_versions(logs)
    ckpt = read_checkpoint(last_ckpt)
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
    return {
        "final_val_loss": spread(final),
        "bpc": spread([v / LN2 for v in final]),
        "best_val_loss": spread([x["best_val_loss"] for x in results]),
        "seeds": [r["seed"] for r in runs],
        "params": runs[0]["facts"]["params"],
        "steps": statistics.fmean(r["plan"]["steps"] for r in runs),
        "tokens": statistics.fmean(r["plan"]["steps"] * plan["tokens_per_step"] for r in runs),
        "flops": statistics.fmean(r["plan"]["steps"] * plan["tokens_per_step"] * plan["flops_per_token"] for r in runs),
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


# ----- the outputs -----------------------------------------------------------------------
def _pm(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


def _si(x: float | None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return ""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


COLUMNS = ["rank", "entry", "final val loss", "min–max", "bpc", "best val loss", "params", "steps", "tokens",
           "FLOPs", "train time (s)", "tok/s", "MFU", "vs. the entry above"]


def markdown(report: dict) -> str:
    """results.md: what was compared, on what, and the ranked table."""
    seeds = report["seeds"]
    head = [f"# gptnano compare {report['name']}", "",
            f"Budget: {report['budget_text']}, i.e. {report['budget']}. {seeds} seed{'s' * (seeds > 1)} per entry "
            "(a seed sets seed_everything and data.seed: initialisation, dropout and the order of training windows).",
            "Final validation loss: at the last step of each run's finished schedule (nats per token), mean ± "
            "standard deviation over seeds; bpc: bits per token (per character for a character-level text).",
            f"Text: {report['text']}. Precision: {report['precision']}. Machine: {report['machine_line']}.", ""]
    rows = []
    for i, (label, e, verdict) in enumerate(ranking(report["entries"]), 1):
        f = e["final_val_loss"]
        rows.append([str(i), label, _pm(f), f"{f['min']:.4f}–{f['max']:.4f}", _pm(e["bpc"], 3),
                     f"{e['best_val_loss']['mean']:.4f}", _si(e["params"]), f"{e['steps']:.0f}", _si(e["tokens"]),
                     _si(e["flops"]), f"{e['train_s']:.0f}" if e["train_s"] is not None else "",
                     _si(e["tok_s"]), f"{100 * e['mfu']:.3g}%" if e["mfu"] is not None else "", verdict])
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    foot = ["", "Two entries are *not distinguishable at N seeds* when their mean final losses differ by less "
            "than two standard errors of the difference, sqrt(s₁²/n₁ + s₂²/n₂). tok/s and MFU: training "
            "medians from TensorBoard; train time: Lightning's Timer (training and validations, no start-up)."]
    if report.get("warnings"):
        foot += [""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(head + table + foot) + "\n"


def write_json(path: Path, report: dict) -> Path:
    return atomic_write(path, json.dumps(report, indent=1, default=str) + "\n")


def band(curves: list[list[tuple[float, float]]]):
    """Mean x, and mean, min and max loss, over seeds, validation by validation: the i-th
    validation of every seed together (the seeds of an entry validate at the same steps, except
    under a wall-time budget, where the i-th validation is still at the same share of each run)."""
    import numpy as np

    n = min(len(c) for c in curves)
    xs = np.array([[c[i][0] for i in range(n)] for c in curves]).mean(0)
    ys = np.array([[c[i][1] for i in range(n)] for c in curves])
    return xs, ys.mean(0), ys.min(0), ys.max(0)


def plot(report: dict, runs: list[dict], out: Path) -> bool:
    """results.png: validation loss against training tokens and against training time, the
    mean over seeds with a min–max band, one colour per entry. False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for i, (label, _, _) in enumerate(ranking(report["entries"])):
        mine = [r for r in runs if r["entry"] == label]
        colour = f"C{i % 10}"
        per_step = mine[0]["plan"]["tokens_per_step"]
        for ax, x_of in ((by_tokens, lambda p: p[0] * per_step), (by_time, lambda p: p[1])):
            xs, mean, low, high = band([[(x_of(p), p[2]) for p in r["result"]["curve"]] for r in mine])
            ax.plot(xs, mean, color=colour, marker=".", label=f"{label} ({len(mine)} seed{'s' * (len(mine) > 1)})")
            if len(mine) > 1:
                ax.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)
    by_tokens.set(xlabel="training tokens", ylabel="validation loss (nats/token)",
                  title=f"validation loss vs tokens ({report['budget_text']})")
    by_time.set(xlabel="training time (s, validations included)", title="the same runs vs training time")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
    by_tokens.legend(fontsize=8)
    fig.suptitle("mean over seeds, band: min–max", fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def safe_name(text: str) -> str:
    """A folder name from any text: letters, digits and ._=,+- kept, the rest as _."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text).strip("._") or "run"
