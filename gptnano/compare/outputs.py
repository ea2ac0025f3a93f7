"""The outputs of `gptnano compare`: results.md (what was compared, on what, the ranked table,
the failed runs, and loss against size over a grid), results.json (the same report, and every
run's record), results.png (the validation curves of every entry, mean over seeds with a
min–max band) and, over a grid of sizes or entries of different FLOPs, results_scaling.png.
They travel: no absolute path of the machine they were made on (``portable``). No Lightning here.
"""

import json
import os
import re
from pathlib import Path

from gptnano.compare.stats import differ_in_flops, ranking
from gptnano.files import atomic_write, shown_path
from gptnano.numbers import markdown_table, quantity

# An absolute path inside a text: POSIX (/a/b) or Windows (C:\a\b), not part of a word (tok/s, val/loss, 1/4).
ABSOLUTE = re.compile(r"(?<![\w.:/~-])/[^\s\"',;|()\[\]{}]+|(?<![\w])[A-Za-z]:[\\/][^\s\"',;|()\[\]{}]+")


def portable(text: str) -> str:
    """``text`` (a command-line token, a file's path, an error line) without this machine's folders:
    every absolute path in it relative to the working folder where it lies inside it, else just
    its file name (``--data.path=/home/me/input.txt`` -> ``--data.path=input.txt``)."""
    def travel(m: re.Match) -> str:
        shown = shown_path(m.group(0))
        return shown if not os.path.isabs(shown) else re.split(r"[\\/]", m.group(0).rstrip("\\/"))[-1]

    return ABSOLUTE.sub(travel, text)


def portable_record(record: dict) -> dict:
    """A run's record as results.json holds it: its fit command, config and failure made
    ``portable``, its text named by file name (its sha256 is beside it)."""
    out = {**record, "argv": [portable(a) for a in record.get("argv", [])],
           "config": portable(str(record.get("config", "")))}
    if "facts" in record:
        out["facts"] = {**record["facts"], "text": Path(portable(str(record["facts"].get("text", "")))).name}
    for key in ("failure", "earlier_failures"):
        if isinstance(record.get(key), str):
            out[key] = portable(record[key])
        elif isinstance(record.get(key), list):
            out[key] = [portable(str(x)) for x in record[key]]
    return out


def _pm(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


COLUMNS = ["rank", "entry", "final val loss", "min–max", "bpc", "best val loss", "params", "steps", "tokens",
           "FLOPs", "train time (s)", "tok/s", "MFU", "vs. the entry above"]


def texts(report: dict) -> str:
    """``input.txt (sha256 86c4…)``: the texts by file name and content."""
    found = report.get("texts") or [{"file": report["text"], "sha256": None}]
    return ", ".join(t["file"] + (f" (sha256 {t['sha256']})" if t.get("sha256") else "") for t in found)


def markdown(report: dict) -> str:
    """results.md: what was compared, on what, the ranked table, the failed runs and the
    iso-budget curves of a grid over sizes."""
    seeds = report["seeds"]
    head = [f"# gptnano compare {report['name']}", "",
            f"Budget: {report['budget_text']}, i.e. {report['budget']}. {seeds} seed{'s' * (seeds > 1)} per entry "
            "(a seed sets seed_everything and data.seed: initialisation, dropout and the order of training windows).",
            "Final validation loss: at the last step of each run's finished schedule (nats per token), mean ± "
            "standard deviation over seeds; bpc: bits per token (per character for a character-level text).",
            f"Text: {texts(report)}. Precision: {report['precision'] or '–'}. Machine: {report['machine_line']}.", ""]
    rows = []
    for i, (label, e, verdict) in enumerate(ranking(report["entries"]), 1):
        f = e["final_val_loss"]
        rows.append(dict(zip(COLUMNS, [
            i, label, _pm(f), f"{f['min']:.4f}–{f['max']:.4f}", _pm(e["bpc"], 3), f"{e['best_val_loss']['mean']:.4f}",
            quantity(e["params"]), f"{e['steps']:.0f}", quantity(e["tokens"]), quantity(e["flops"]),
            f"{e['train_s']:.0f}" if e["train_s"] is not None else "", quantity(e["tok_s"]),
            f"{100 * e['mfu']:.3g}%" if e["mfu"] is not None else "", verdict])))
    table = list(markdown_table(rows, COLUMNS)) if rows else ["No entry finished all its seeds."]
    foot = ["", "Two entries are *not distinguishable at N seeds* when their mean final losses differ by less "
            "than two standard errors of the difference, sqrt(s₁²/n₁ + s₂²/n₂). tok/s and MFU: training "
            "medians from TensorBoard; train time: Lightning's Timer (training and validations, no start-up)."]
    if report.get("warnings"):
        foot += [""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(head + table + foot + failures(report) + iso_budget(report)) + "\n"


def failures(report: dict) -> list[str]:
    """The entries not ranked: each failed run and why, and what its finished seeds reached."""
    unranked = report.get("not_ranked") or {}
    if not unranked:
        return []
    cols = ["entry", "failed runs", "finished seeds", "final val loss (finished seeds)"]
    rows = []
    for label, u in unranked.items():
        done = u.get("finished")
        rows.append(dict(zip(cols, [
            label, "; ".join(f"s{f['seed']}: {f['failure']}" for f in u["failures"]),
            f"{len(done['seeds']) if done else 0}/{u['seeds']}" + (f" ({', '.join(map(str, done['seeds']))})"
                                                                   if done else ""),
            f"{_pm(done['final_val_loss'])}" if done else ""])))
    return ["", "## Failed runs", "",
            "An entry with a failed seed is not ranked; the seeds it finished are shown. A run fails when its fit "
            "ends with an error or its loss becomes non-finite (diverges). The same command again keeps these "
            "results; with --retry_failed it trains the failed runs again (from their last checkpoint).", "",
            *markdown_table(rows, cols)]


def iso_budget(report: dict) -> list[str]:
    """A table per iso-budget curve: parameters -> final validation loss."""
    curves = report.get("iso_budget") or []
    if not curves:
        return []
    out = ["", "## Loss against size at this budget", "",
           f"Entries of one config that differ only in size (a --grid over it), each trained for {report['budget_text']}"
           ", smallest first: an iso-budget curve (results_scaling.png draws it)."]
    flops = "training FLOPs"
    for curve in curves:
        cols = ["params", "entry", "final val loss"]
        if differ_in_flops({p["entry"]: p for p in curve["points"]}):
            cols.append(flops)
        fixed = ", ".join(f"{k}={v}" for k, v in curve["fixed"].items())
        rows = [dict(zip(cols, [quantity(p["params"]), p["entry"], _pm(p["final_val_loss"]),
                                f"{p['flops']:.3g}"])) for p in curve["points"]]
        out += ["", f"### {curve['config']}" + (f" ({fixed})" if fixed else ""), "", *markdown_table(rows, cols)]
    return out


def write_json(path: Path, report: dict) -> Path:
    return atomic_write(path, json.dumps(report, indent=1, default=str) + "\n")


def band(curves: list[list[tuple[float, float]]]):
    """Mean x, and mean, min and max loss, over seeds, validation by validation: the i-th
    validation of every seed together (the seeds of an entry validate at the same steps, except
    under a wall-time budget, where each run plans its own). Counted from the end, so that the
    last point is every seed's final validation, the loss the results table gives, where a
    re-planned seed validated once more or less."""
    import numpy as np

    n = min(len(c) for c in curves)
    xs = np.array([[c[len(c) - n + i][0] for i in range(n)] for c in curves]).mean(0)
    ys = np.array([[c[len(c) - n + i][1] for i in range(n)] for c in curves])
    return xs, ys.mean(0), ys.min(0), ys.max(0)


def _pyplot():
    """matplotlib's pyplot drawing to files, or None where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(report: dict, runs: list[dict], out: Path) -> bool:
    """results.png: validation loss against training tokens and against training time, the
    mean over seeds with a min–max band, one colour per entry (dashed: the finished seeds of an
    entry not ranked). False if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    shown = [(label, "-", "") for label, _, _ in ranking(report["entries"])]
    shown += [(label, "--", ", not ranked") for label, u in (report.get("not_ranked") or {}).items() if u["finished"]]
    for i, (label, style, note) in enumerate(shown):
        mine = [r for r in runs if r["entry"] == label and r.get("status") == "done"]
        colour = f"C{i % 10}"
        per_step = mine[0]["plan"]["tokens_per_step"]
        for ax, x_of in ((by_tokens, lambda p: p[0] * per_step), (by_time, lambda p: p[1])):
            xs, mean, low, high = band([[(x_of(p), p[2]) for p in r["result"]["curve"]] for r in mine])
            ax.plot(xs, mean, style, color=colour, marker=".",
                    label=f"{label} ({len(mine)} seed{'s' * (len(mine) > 1)}{note})")
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


def wants_scaling(report: dict) -> bool:
    """Whether results_scaling.png has something to show: an iso-budget curve, or ranked entries
    that differ in training FLOPs."""
    return bool(report.get("iso_budget")) or differ_in_flops(report["entries"])


def plot_scaling(report: dict, out: Path) -> bool:
    """results_scaling.png: final validation loss (mean ± std over seeds) against parameters, one
    line per iso-budget curve; and, where the entries differ in training FLOPs, against those FLOPs
    (the curves as lines, every other ranked entry as a point). False if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    curves, entries = report.get("iso_budget") or [], report["entries"]
    panels = (["params"] if curves else []) + (["flops"] if differ_in_flops(entries) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), sharey=True, squeeze=False)
    on_curves = {p["entry"] for c in curves for p in c["points"]}
    for ax, x in zip(axes[0], panels):
        for i, c in enumerate(curves):
            fixed = ", ".join(f"{k}={v}" for k, v in c["fixed"].items())
            f = [p["final_val_loss"] for p in c["points"]]
            ax.errorbar([p[x] for p in c["points"]], [s["mean"] for s in f], yerr=[s["std"] or 0 for s in f],
                        color=f"C{i % 10}", marker="o", capsize=3, label=c["config"] + (f" ({fixed})" if fixed else ""))
        if x == "flops":
            for j, (label, e) in enumerate(e for e in entries.items() if e[0] not in on_curves):
                s = e["final_val_loss"]
                ax.errorbar([e["flops"]], [s["mean"]], yerr=[s["std"] or 0], color=f"C{(len(curves) + j) % 10}",
                            marker="s", capsize=3, linestyle="none", label=label)
        ax.set_xscale("log")
        ax.set(xlabel="parameters" if x == "params" else "training FLOPs per run", ylabel="final validation loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_title(f"final validation loss at {report['budget_text']} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True
