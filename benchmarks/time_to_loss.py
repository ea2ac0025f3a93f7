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

    python -m benchmarks.time_to_loss [--target 1.88] [--runs default recipe before-rope]
                                      [--rounds N]        # the runs alternated N times
                                      [--extra ARGS...]   # appended to every run, e.g. a sweep
                                      [--device cuda] [--name time_to_loss]

before-rope is configs/gpt.yaml as it was before it took rotary positions (learned positions,
warmup 100, AdamW's rate 4e-3, 1000 steps, a validation every 250): `--runs default before-rope --rounds 3` times
the two alternately, so that the machine's drift falls on both.

--device cuda does the same on a GPU with configs/gpu/gpt.yaml (nanoGPT's "baby GPT") and a
target of 1.47 (nanoGPT's documented 1.4697 for it): the recipe is then nanoGPT's GPU one
(AdamW, lr 1e-3 -> 1e-4, 5000 steps), its plain loop compiled with bf16 autocast (as
nanoGPT's train.py), and its yardstick that loop's pace over 1750 iterations, where nanoGPT's
own run on an H100 first estimated a loss <= 1.47 (20-batch estimate, iteration 1750).
"""

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import announce_machine, corpus_path, markdown_table, write_result
from gptnano.logs import read_run
from gptnano.numbers import median

RUNS = {
    "default": [],
    # configs/gpt.yaml before it took RoPE (docs/results.md, "GPT options at equal wall time").
    "before-rope": ["--model.net.rope", "false", "--model.warmup_steps", "100", "--model.learning_rate", "4e-3",
                    "--trainer.max_steps", "1000", "--trainer.val_check_interval", "250"],
    "recipe": ["--model.optimizer", "adamw", "--trainer.precision", "32-true", "--data.batch_size", "12", "--model.learning_rate", "1e-3",
               "--model.min_lr", "1e-4", "--trainer.max_steps", "2000"],
}
# On a GPU: the GPU config as it is, and nanoGPT's baby-GPT recipe (the config's sizes, AdamW, 5000 steps).
GPU_RUNS = {"default": [], "recipe": ["--model.optimizer", "adamw", "--trainer.max_steps", "5000"]}
# Per device: the target loss, the recipe's batch size and its iterations to that target.
YARDSTICK = {"cpu": (1.88, 12, 2000), "cuda": (1.47, 64, 1750)}


def time_to_target(name: str, args: list[str], target: float, folder: Path, device: str = "cpu") -> dict:
    from benchmarks.train_speed import config

    cmd = [sys.executable, "-m", "gptnano", "fit", "--config", config("gpt", device),
           "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
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


def recipe_pace(device: str = "cpu", steps: int = 150) -> float:
    """Seconds per iteration of nanoGPT's recipe in a plain PyTorch loop: on the CPU fp32 at
    batch 12; on a GPU compiled, bf16, batch 64 (benchmarks.train_speed.plain_segment)."""
    from benchmarks.train_speed import plain_segment, plain_setup

    batch = YARDSTICK[device][1]
    probe, windows = plain_setup("gpt", batch_size=batch, device=device)
    tokens = batch * probe.model.net.block_size
    return tokens / median(plain_segment(probe.model.net, windows, steps, 1e-3, device))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--target", type=float, help="validation loss to reach (default: 1.88 on the CPU, 1.47 on a GPU)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--extra", default="", help="extra `gptnano fit` arguments for every run, as one string")
    ap.add_argument("--keep", help="folder for the runs' logs and checkpoints (default: a temporary one)")
    ap.add_argument("--rounds", type=int, default=1, help="run the --runs this many times, alternately")
    ap.add_argument("--name", help="results file name (default: time_to_loss, time_to_loss_cuda on a GPU)")
    args = ap.parse_args()
    announce_machine()
    target, _, iterations = YARDSTICK[args.device]
    args.target = args.target or target
    runs = GPU_RUNS if args.device == "cuda" else RUNS
    if set(args.runs) - set(runs):
        raise SystemExit(f"--runs {' '.join(sorted(set(args.runs) - set(runs)))}: not on {args.device} "
                         f"(there: {', '.join(runs)})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for turn, name in ((r, n) for r in range(args.rounds) for n in args.runs):
            label = f"{name}-{turn}" if args.rounds > 1 else name
            row = time_to_target(label, runs[name] + shlex.split(args.extra), args.target, folder, args.device)
            print(row, flush=True)
            rows.append(row)
    pace = recipe_pace(args.device)
    yardstick = iterations * pace
    print(f"nanoGPT's recipe in a plain loop: {1000 * pace:.1f} ms/iteration, "
          f"{yardstick:.1f} s for {iterations} iterations (no start-up, no evaluation)")
    for row in rows:
        t = row[f"time to {args.target} (s)"]
        row["/ recipe in plain loop"] = round(t / yardstick, 2) if isinstance(t, float) else ""
    print()
    print(markdown_table(rows, list(rows[0])))
    if not args.extra:
        name = args.name or ("time_to_loss" if args.device == "cpu" else f"time_to_loss_{args.device}")
        path = write_result(name, {"device": args.device, "target": args.target, "recipe_iterations": iterations,
                                   "recipe_plain_loop_s": round(yardstick, 1), "rows": rows})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
