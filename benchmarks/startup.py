"""Start-up time of the `gptnano` commands: whole-process wall time (from exec to
exit), several runs each, median.

Every command runs as `python -m gptnano ...`. With ``--compare DIR`` the same
commands also run against the gptnano package in DIR (another commit's code,
e.g. ``git archive <commit> gptnano | tar -x -C DIR``), so a before/after table
comes from one sitting of a shared machine. The runs go round-robin (one run of
everything, then the next round), so a slow moment spreads over all commands
instead of hitting one. `python -c "import torch"` is the floor of every command
that touches a model. `generate` and `predict` sample 20 tokens from a tiny
checkpoint trained first (or the one given with --ckpt). A command that fails
(e.g. one the compared code does not have) is reported as such.
Writes benchmarks/results/startup.json.

    python -m benchmarks.startup [--runs 7] [--compare DIR] [--ckpt PATH]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_result
from gptnano.numbers import median

TINY_FIT = ["fit", "--model.net", "GPT", "--model.net.block_size", "16", "--model.net.n_layer", "1",
            "--model.net.n_head", "2", "--model.net.n_embd", "16", "--data.batch_size", "4",
            "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"]
FLOOR = 'python -c "import torch"'


def tiny_checkpoint(folder: Path) -> Path:
    """A 5-step GPT on a few kilobytes of text: the smallest real checkpoint."""
    from tests.conftest import make_text

    text = folder / "tiny.txt"
    text.write_text(make_text(), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "gptnano", *TINY_FIT, "--data.path", str(text)], cwd=folder, check=True,
                   capture_output=True)
    return folder / "checkpoints" / "gpt" / "last.ckpt"


def commands(ckpt: Path) -> dict[str, list[str]]:
    """What a user types after `gptnano`, by the name the table shows."""
    return {
        "gptnano --help": ["--help"],
        "gptnano fit --help": ["fit", "--help"],
        "gptnano plot --help": ["plot", "--help"],
        "gptnano senses --help": ["senses", "--help"],
        "gptnano generate (tiny ckpt, 20 tokens)": ["generate", "--ckpt_path", str(ckpt), "--max_new_tokens", "20",
                                                    "--prompt", "ROMEO:"],
        "gptnano predict (tiny ckpt, 20 tokens)": ["predict", "--ckpt_path", str(ckpt), "--model.max_new_tokens", "20",
                                                   "--data.prompt", "ROMEO:"],
    }


def time_once(argv: list[str], cwd: Path, env: dict) -> float | None:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start if proc.returncode == 0 else None


def cell(ts: list[float | None]) -> str:
    ok = [t for t in ts if t is not None]
    return f"{median(ok):.2f} ({min(ok):.2f}-{max(ok):.2f})" if len(ok) == len(ts) else "fails"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--compare", help="a folder holding another version of the gptnano package")
    ap.add_argument("--ckpt", help="checkpoint for generate/predict (default: train a tiny one)")
    ap.add_argument("--name", default="startup", help="results file name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("GPTNANO_DATA", "PYTHONPATH")}
    variants = {"this code": env}
    if args.compare:
        variants[f"code in {args.compare}"] = {**env, "PYTHONPATH": str(Path(args.compare).resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = Path(args.ckpt).resolve() if args.ckpt else tiny_checkpoint(folder)
        todo = {(FLOOR, "-"): ([sys.executable, "-c", "import torch"], env)}
        for name, tail in commands(ckpt).items():
            for variant, variant_env in variants.items():
                todo[(name, variant)] = ([sys.executable, "-m", "gptnano", *tail], variant_env)
        times = {key: [] for key in todo}
        for _ in range(args.runs):
            for key, (argv, variant_env) in todo.items():
                times[key].append(time_once(argv, folder, variant_env))
    rows = [{"command": FLOOR, **{f"{v}: median (min-max) s": cell(times[(FLOOR, "-")]) for v in variants}}]
    for name in commands(Path()):
        rows.append({"command": name, **{f"{v}: median (min-max) s": cell(times[(name, v)]) for v in variants}})
    table = markdown_table(rows, list(rows[0]))
    print(table)
    path = write_result(args.name, {"runs": args.runs, "compare": args.compare, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
