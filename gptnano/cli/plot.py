"""`gptnano plot`: validation loss against wall-clock time and against step, for
several runs, as one PNG and a markdown table, read from TensorBoard logs.

    gptnano plot lightning_logs/gpt lightning_logs/rnn --out compare.png
"""

import argparse
import math
from pathlib import Path

from gptnano.errors import UserError
from gptnano.files import atomic_write
from gptnano.logs import read_run
from gptnano.numbers import markdown_table, median


def summary(run: dict) -> dict:
    val = run["series"]["val/loss"]
    best = min(v for _, _, v in val)
    tok = [v for _, _, v in run["series"].get("perf/tok_s", [])]
    mfu = [v for _, _, v in run["series"].get("perf/mfu", [])]
    row = {
        "run": run["name"],
        "best val_loss": f"{best:.4f}",
        "bpc": f"{best / math.log(2):.3f}",
        "steps": val[-1][1],
        "wall (s)": round(val[-1][0] - run["start"]),
        "tok/s": round(median(tok)) if tok else "",
        "MFU": f"{100 * median(mfu):.1f}%" if mfu else "",
    }
    return row


def plot(runs: list[dict], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError("gptnano plot needs matplotlib: pip install 'gptnano[plot]' (or pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in runs:
        val = run["series"]["val/loss"]
        by_time.plot([t - run["start"] for t, _, _ in val], [v for *_, v in val], marker=".", label=run["name"])
        by_step.plot([s for _, s, _ in val], [v for *_, v in val], marker=".", label=run["name"])
    by_time.set(xlabel="wall-clock time (s)", ylabel="validation loss (nats/char)", title="validation loss vs time")
    by_step.set(xlabel="optimizer step", title="validation loss vs step")
    for ax in (by_time, by_step):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="gptnano plot", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders: lightning_logs/<run_name> (or one version_N folder)")
    ap.add_argument("--out", default="val_loss.png", help="PNG to write (default: val_loss.png)")
    args = ap.parse_args(argv)
    folders = [Path(r) for r in args.runs]
    for f in folders:
        if not f.is_dir():
            raise UserError(f"not a folder: {f}")
    runs = [read_run(f) for f in folders]
    plot(runs, Path(args.out))
    rows = [summary(r) for r in runs]
    print("\n".join(markdown_table(rows, list(rows[0]))))
    print(f"\nwrote {args.out}")
