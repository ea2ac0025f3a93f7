"""Quality at a fixed wall-clock budget: every architecture trains for the same
time (default 5 minutes) through the real `gptnano fit`, one after another on
the same machine, each with its own configs/<arch>.yaml; max_steps is set so
the run (and its learning-rate decay) fits the budget at the throughput a short
probe measures just before, and --trainer.max_time enforces it.

Records per run: best validation loss, bits per char, steps reached, median
training tok/s and MFU (from TensorBoard), peak resident memory of the process,
and the validation-loss curve over time (TensorBoard). Then draws the
comparison plot and table with `gptnano plot`, merges generation speed from
benchmarks/results/generate_speed.json when present, and writes
benchmarks/results/budget.json, budget.md and budget.png.

    python -m benchmarks.budget [--minutes 5] [--archs gpt rnn backpack cnn] [--out DIR] [--replot]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, announce_machine, corpus_path, markdown_table, median, write_result
from gptnano.cli.plot import plot, read_run, summary


def planned_steps(arch: str, minutes: float) -> int:
    """Steps that fit the budget at the throughput measured right now (a short probe of
    the same training path, as in train_speed.py: a shared machine's speed drifts), 90 %
    of it to leave time for start-up and validation, so the learning rate finishes its
    decay in time."""
    from benchmarks.train_speed import ours_segment

    speeds, cli = ours_segment(arch, 40, None)
    tokens_per_step = cli.datamodule.batch_size * cli.model.net.block_size
    steps = int(0.9 * minutes * 60 * median(speeds) / tokens_per_step)
    print(f"  probe: {median(speeds):.0f} tok/s -> {steps} steps", flush=True)
    return steps


def train(arch: str, minutes: float, out: Path) -> dict:
    """One `gptnano fit` limited to ``minutes`` of wall-clock; returns its peak RSS and time."""
    limit = f"00:00:{int(minutes):02d}:{round((minutes % 1) * 60):02d}"
    cmd = [sys.executable, "-m", "gptnano", "fit", "--config", str(ROOT / "configs" / f"{arch}.yaml"),
           "--data.path", corpus_path(), "--run_name", f"budget-{arch}", "--trainer.max_time", limit,
           "--trainer.enable_progress_bar", "false"]
    for old in (out / "checkpoints" / f"budget-{arch}", out / "lightning_logs" / f"budget-{arch}"):
        shutil.rmtree(old, ignore_errors=True)  # a fresh run, not a refused second fit into last.ckpt
    steps = planned_steps(arch, minutes)
    cmd += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(max(50, steps // 10))]
    start = time.time()
    with open(out / f"budget-{arch}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{arch}: gptnano fit failed, see {out / f'budget-{arch}.log'}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024), "process_wall_s": round(time.time() - start, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--archs", nargs="+", default=["gpt", "rnn", "backpack", "cnn"])
    ap.add_argument("--out", default=str(RESULTS / "budget-runs"), help="working folder for the runs' logs")
    ap.add_argument("--replot", action="store_true",
                    help="no training: rebuild the table and plot from the runs' logs and the saved budget.json")
    args = ap.parse_args()
    announce_machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    gen = {}
    gen_file = RESULTS / "generate_speed.json"
    if gen_file.exists():
        gen = {r["arch"]: r for r in json.loads(gen_file.read_text())["rows"]}

    rows, runs = [], []
    for arch in args.archs:
        if args.replot:
            saved = {r["run"]: r for r in json.loads((RESULTS / "budget.json").read_text())["rows"]}
            proc = {"peak_rss_mb": saved[arch]["peak RSS (MB)"]}
        else:
            print(f"training {arch} for {args.minutes:g} min ...", flush=True)
            proc = train(arch, args.minutes, out)
        run = read_run(out / "lightning_logs" / f"budget-{arch}")
        run["name"] = arch
        runs.append(run)
        row = summary(run)
        row["peak RSS (MB)"] = proc["peak_rss_mb"]
        if arch in gen:
            row["generate tok/s"] = gen[arch]["cached tok/s"]
        rows.append(row)
        print("  ", row, flush=True)

    plot(runs, RESULTS / "budget.png")
    table = markdown_table(rows, list(rows[0]))
    (RESULTS / "budget.md").write_text(table + "\n")
    curves = {r["name"]: [(round(t - r["start"], 1), s, v) for t, s, v in r["series"]["val/loss"]] for r in runs}
    path = write_result("budget", {"minutes": args.minutes, "rows": rows, "val_loss_curves": curves})
    print()
    print(table)
    print(f"\nwrote {path}, {RESULTS / 'budget.md'}, {RESULTS / 'budget.png'}")


if __name__ == "__main__":
    main()
