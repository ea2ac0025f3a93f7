"""Start-up time of the `gptnano` commands: whole-process wall time (the console
script as a user types it, from exec to exit), several runs each, median.

The commands run round-robin (one run of each, then the next round) so that a
slow moment of a shared machine spreads over all of them instead of one.
`python -c "import torch"` is the floor every command that touches a model pays.
`generate` and `predict` sample 20 tokens from a tiny checkpoint trained first
(or the one given with --ckpt). A command that fails is reported as such.
Writes benchmarks/results/startup.json.

    python -m benchmarks.startup [--runs 7] [--ckpt PATH] [--name startup]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, median, write_result

TINY_FIT = ["fit", "--model.net", "GPT", "--model.net.block_size", "16", "--model.net.n_layer", "1",
            "--model.net.n_head", "2", "--model.net.n_embd", "16", "--data.batch_size", "4",
            "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"]


def tiny_checkpoint(folder: Path) -> Path:
    """A 5-step GPT on a few kilobytes of text: the smallest real checkpoint."""
    from tests.conftest import make_text

    text = folder / "tiny.txt"
    text.write_text(make_text(), encoding="utf-8")
    subprocess.run([gptnano(), *TINY_FIT, "--data.path", str(text)], cwd=folder, check=True, capture_output=True)
    return folder / "checkpoints" / "gpt" / "last.ckpt"


def gptnano() -> str:
    """The console script of the active environment (the one `pip install -e .` wrote)."""
    found = shutil.which("gptnano", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("no gptnano console script beside this Python: pip install -e .")
    return found


def commands(ckpt: Path) -> dict[str, list[str]]:
    cmd = gptnano()
    sample = ["--ckpt_path", str(ckpt), "--max_new_tokens", "20"]
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "gptnano --help": [cmd, "--help"],
        "gptnano fit --help": [cmd, "fit", "--help"],
        "gptnano plot --help": [cmd, "plot", "--help"],
        "gptnano senses --help": [cmd, "senses", "--help"],
        "gptnano generate (tiny ckpt, 20 tokens)": [cmd, "generate", *sample, "--prompt", "ROMEO:"],
        "gptnano predict (tiny ckpt, 20 tokens)": [cmd, "predict", "--ckpt_path", str(ckpt),
                                                   "--model.max_new_tokens", "20", "--data.prompt", "ROMEO:"],
    }


def time_once(argv: list[str], cwd: Path) -> float | None:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start if proc.returncode == 0 else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--ckpt", help="checkpoint for generate/predict (default: train a tiny one)")
    ap.add_argument("--name", default="startup", help="results file name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else tiny_checkpoint(folder)
        todo = commands(ckpt.resolve())
        times: dict[str, list[float | None]] = {name: [] for name in todo}
        for _ in range(args.runs):
            for name, argv in todo.items():
                times[name].append(time_once(argv, folder))
    rows = []
    for name, ts in times.items():
        ok = [t for t in ts if t is not None]
        rows.append({"command": name, "median (s)": f"{median(ok):.2f}" if len(ok) == len(ts) else "fails",
                     "min (s)": f"{min(ok):.2f}" if ok else "", "max (s)": f"{max(ok):.2f}" if ok else ""})
    table = markdown_table(rows, list(rows[0]))
    print(table)
    path = write_result(args.name, {"runs": args.runs, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
