"""Helpers shared by the benchmark scripts: the corpus, configs, peak FLOP/s, results."""

import importlib
import json
import os
from pathlib import Path

import yaml

from gptnano import numbers
from gptnano.files import atomic_write
from gptnano.hardware import machine_info, machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def corpus_path() -> str:
    """tiny Shakespeare: $GPTNANO_DATA, else the shared copy beside the repository, else data/."""
    for candidate in (os.environ.get("GPTNANO_DATA"), SHARED_TEXT, ROOT / "data" / "tinyshakespeare" / "input.txt"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise SystemExit("tiny Shakespeare not found: set GPTNANO_DATA=/path/to/input.txt")


def load_config(arch: str, folder: str = "configs") -> dict:
    return yaml.safe_load((ROOT / folder / f"{arch}.yaml").read_text())


def build_net(arch: str, vocab_size: int, **overrides):
    """The architecture of configs/<arch>.yaml, built directly (no Lightning)."""
    cfg = load_config(arch)["model"]["net"]
    module, name = cfg["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**cfg.get("init_args", {}), "vocab_size": vocab_size, **overrides})


def rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/NAME.json, with where it was measured (CPU model, its capability,
    whether bf16 is fast there, threads, torch) in front."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info(), **payload}
    path = RESULTS / f"{name}.json"
    return atomic_write(path, json.dumps(payload, indent=2) + "\n")


def announce_machine() -> None:
    """The first line of every benchmark's output: the machine its numbers come from."""
    print(f"machine: {machine_line()}", flush=True)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows``, captioned with the machine it was measured on."""
    return "\n".join([f"Measured on: {machine_line()}", "", *numbers.markdown_table(rows, columns)])


def run_compare(argv: list[str], name: str, out: str) -> None:
    """``gptnano compare ARGV`` (whose ``--name`` is ``name``) from the repository root, then its
    results (md, json, png, scaling png) copied to benchmarks/results/OUT.*. A comparison with a
    failed run (exit 1) still has results to copy."""
    from gptnano.cli.main import main as gptnano

    os.chdir(ROOT)  # compare/ (git-ignored) at the repository root, configs/ relative to it
    print("gptnano " + " ".join(argv), flush=True)
    try:
        gptnano(argv)
    except SystemExit as e:
        if e.code not in (0, 1, None):
            raise
    for file in ("results.md", "results.json", "results.png", "results_scaling.png"):
        source = Path("compare") / name / file
        if source.is_file():
            print(f"wrote {atomic_write(RESULTS / file.replace('results', out), source.read_bytes())}")
