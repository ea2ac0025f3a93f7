"""The 5-minute model (issue 28): `gptnano fit --config configs/gpt-5min.yaml` run whole, as a user
runs it, once per grid point, each timed from the command's launch to its exit. Reports each
point's best validation loss, its planned steps and its wall time, and whether it ended within the
budget. Writes benchmarks/results/five_minutes[_TAG].{json,md}.

    python -m benchmarks.five_minutes [--grid model.net.n_embd=128,192 ...] [--tag avx2] [--extra ARGS...]

Why not `gptnano compare --budget 5min`: compare's time budget counts each run's training time
(Lightning's Timer), while the 5-minute promise counts from launch, start-up and the last checkpoint
included, which only the shipped config's own TimeBudget plans for. Run it on an otherwise idle
machine, one point after another (each takes 5 minutes). To size for the AVX2 kind on an AVX-512
machine, run it under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2.
"""

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, ROOT, announce_machine, corpus_path, markdown_table, write_result
from gptnano.files import atomic_write

CONFIG = ROOT / "configs" / "gpt-5min.yaml"


def points(grids: list[str]) -> list[dict[str, str]]:
    """``["a=1,2", "b=x"]`` -> ``[{"a": "1", "b": "x"}, {"a": "2", "b": "x"}]`` (every combination)."""
    axes = [(key, values.split(",")) for key, values in (g.split("=", 1) for g in grids)]
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])] or [{}]


def run_point(point: dict[str, str], extra: list[str], folder: Path) -> dict:
    argv = [sys.executable, "-m", "gptnano", "fit", "--config", str(CONFIG), "--data.path", corpus_path(),
            "--trainer.enable_progress_bar", "false", *(a for k, v in point.items() for a in (f"--{k}", v)), *extra]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = (done.stdout + done.stderr).splitlines()
    if done.returncode != 0:
        return {**point, "error": (lines or ["(no output)"])[-1], "wall_s": round(wall, 1)}
    ckpt = torch.load(folder / "checkpoints" / "gpt-5min" / "last.ckpt", weights_only=True, map_location="cpu")
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("Checkpoint"))
    plan = next((line.split("gptnano: ", 1)[1] for line in reversed(lines) if "time budget" in line), "")  # the re-plan
    return {**point, "best_val_loss": round(float(state["best_model_score"]), 4), "steps": ckpt["global_step"],
            "wall_s": round(wall, 1), "within_5min": wall <= 300.0, "plan": plan}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", action="append", default=[], help="KEY=V1,V2: fit flags to vary (every combination)")
    ap.add_argument("--tag", default="", help="suffix of the results' names (e.g. avx2)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="fit flags for every point")
    args = ap.parse_args()
    announce_machine()
    emulated = os.environ.get("ATEN_CPU_CAPABILITY")
    rows = []
    for i, point in enumerate(points(args.grid), 1):
        with tempfile.TemporaryDirectory() as folder:
            row = run_point(point, args.extra, Path(folder))
        rows.append(row)
        print(f"{i}: {row}", flush=True)
    name = "five_minutes" + (f"_{args.tag}" if args.tag else "")
    payload = {"command": "python -m benchmarks.five_minutes " + " ".join(f"--grid {g}" for g in args.grid),
               "emulated_isa": emulated, "extra": args.extra, "rows": rows}
    print(f"wrote {write_result(name, payload)}")
    columns = [*(points(args.grid)[0] or {}), "best_val_loss", "steps", "wall_s", "within_5min"]
    note = f"CPU capability limited to {emulated} (emulated)\n\n" if emulated else ""
    md = f"# The 5-minute model: {payload['command']}\n\n{note}{markdown_table(rows, columns)}\n"
    print(f"wrote {atomic_write(RESULTS / f'{name}.md', md)}")
    print(md)


if __name__ == "__main__":
    main()
