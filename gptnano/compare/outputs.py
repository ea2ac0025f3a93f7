"""The three outputs of `gptnano compare`: results.md (what was compared, on what, and the
ranked table), results.json (the same report, and every run's record) and results.png (the
validation curves of every entry, mean over seeds with a min–max band). No Lightning here.
"""

import json
from pathlib import Path

from gptnano.compare.stats import ranking
from gptnano.files import atomic_write
from gptnano.numbers import markdown_table, quantity


def _pm(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


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
        rows.append(dict(zip(COLUMNS, [
            i, label, _pm(f), f"{f['min']:.4f}–{f['max']:.4f}", _pm(e["bpc"], 3), f"{e['best_val_loss']['mean']:.4f}",
            quantity(e["params"]), f"{e['steps']:.0f}", quantity(e["tokens"]), quantity(e["flops"]),
            f"{e['train_s']:.0f}" if e["train_s"] is not None else "", quantity(e["tok_s"]),
            f"{100 * e['mfu']:.3g}%" if e["mfu"] is not None else "", verdict])))
    table = list(markdown_table(rows, COLUMNS))
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
