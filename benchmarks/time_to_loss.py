"""Wall-clock time to a validation loss: how long `gptnano fit` takes, from the
moment the command is launched (imports, data, validations and all), until a
validation pass first reports a loss at or below the target (default 1.88, the
loss nanoGPT documents for its CPU recipe on tiny Shakespeare).

Runs, one after another on the same machine:
  * default: `gptnano fit --config configs/gpt.yaml` as a user runs it;
  * recipe:  the same GPT trained through gptnano with nanoGPT's documented CPU
             recipe (AdamW, fp32, batch 12, lr 1e-3 -> 1e-4, 2000 steps);
and reports for each the time to the target, the step it was seen at, the best
validation loss and the total wall time. As the yardstick it then times the
recipe's own training pace in the plain fp32 PyTorch loop of
benchmarks/train_speed.py (batch 12, no Lightning, no validation) and scales it
to the recipe's 2000 iterations: a lower bound of what nanoGPT's recipe costs on
this machine at this moment, so machine speed cancels out of the ratio.
Writes benchmarks/results/time_to_loss.json.

    python -m benchmarks.time_to_loss [--target 1.88] [--runs default recipe]
                                      [--extra ARGS...]   # appended to every run, e.g. a sweep
"""

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, corpus_path, markdown_table, median, write_result
from gptnano.plot import read_run

RUNS = {
    "default": [],
    "recipe": ["--model.optimizer", "adamw", "--trainer.precision", "32-true", "--data.batch_size", "12", "--model.learning_rate", "1e-3",
               "--model.min_lr", "1e-4", "--trainer.max_steps", "2000"],
}


def time_to_target(name: str, args: list[str], target: float, folder: Path) -> dict:
    cmd = [sys.executable, "-m", "gptnano", "fit", "--config", str(ROOT / "configs" / "gpt.yaml"),
           "--data.path", corpus_path(), "--run_name", name, "--trainer.enable_progress_bar", "false", *args]
    print("$ " + shlex.join(cmd[1:]), flush=True)
    start = time.time()
    with open(folder / f"{name}.log", "w") as log:
        status = subprocess.call(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    total = time.time() - start
    if status != 0:
        raise SystemExit(f"{name}: gptnano fit failed, see {folder / f'{name}.log'}")
    val = read_run(folder / "lightning_logs" / name)["series"]["val/loss"]
    hit = next(((t, s, v) for t, s, v in val if v <= target), None)
    return {
        "run": name,
        f"time to {target} (s)": round(hit[0] - start, 1) if hit else "not reached",
        "at step": hit[1] if hit else "",
        "best val_loss": round(min(v for *_, v in val), 4),
        "total wall (s)": round(total, 1),
        "args": " ".join(args),
    }


def recipe_pace(steps: int = 150) -> float:
    """Seconds per iteration of nanoGPT's CPU recipe (fp32, batch 12) in a plain PyTorch loop."""
    from benchmarks.train_speed import plain_segment, plain_setup

    probe, windows = plain_setup("gpt", batch_size=12)
    tokens = 12 * probe.model.net.block_size
    return tokens / median(plain_segment(probe.model.net, windows, steps, 1e-3))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--extra", default="", help="extra `gptnano fit` arguments for every run, as one string")
    ap.add_argument("--keep", help="folder for the runs' logs and checkpoints (default: a temporary one)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.runs:
            row = time_to_target(name, RUNS[name] + shlex.split(args.extra), args.target, folder)
            print(row, flush=True)
            rows.append(row)
    pace = recipe_pace()
    yardstick = 2000 * pace
    print(f"nanoGPT's recipe in a plain fp32 loop: {1000 * pace:.1f} ms/iteration, "
          f"{yardstick:.1f} s for its 2000 iterations (no start-up, no evaluation)")
    for row in rows:
        t = row[f"time to {args.target} (s)"]
        row["/ recipe in plain loop"] = round(t / yardstick, 2) if isinstance(t, float) else ""
    print()
    print(markdown_table(rows, list(rows[0])))
    if not args.extra:
        path = write_result("time_to_loss", {"target": args.target, "recipe_plain_loop_s": round(yardstick, 1),
                                             "rows": rows})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
