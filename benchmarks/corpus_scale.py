"""How preparing and training scale with the corpus: 1 MB ... 1 GB of text.

Builds corpora of growing size from text already on the machine (the Python
standard library's and site-packages' sources and docs: *.py, *.pyi, *.rst,
*.md, *.txt that are valid UTF-8, in a fixed order; repeated when a size needs
more text than there is, which the output says), then for each one runs the
real `gptnano fit --config configs/gpt.yaml` (fp32, 20 steps) and reports:

* prepare MB/s: text size / (scan + tokenize time), from the command's own log lines;
* peak RSS preparing: the process's peak resident memory once the data is ready
  (Lightning's setup hook: imports, scanning, tokenising, checking, the model's
  weights; before any forward pass);
* peak RSS training: the peak over the 20 steps (reset at the first one, Linux'
  /proc/self/clear_refs), per rank under DDP;
* first step, cold / warm: seconds from launching the command to the first training
  step, with no cache (fresh folder) and with the cache the cold run left;
* the same under 2-process CPU DDP, and how many token caches ended up on disk.

    python -m benchmarks.corpus_scale [--sizes 1M 10M 100M 1G] [--tokenizer char|byte]
                                      [--corpora /tmp/corpora] [--work /tmp/corpus_scale] [--no-ddp]

Corpora and run folders go outside the repository (default /tmp); results to
benchmarks/results/corpus_scale[_byte].json.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import lightning as L

from benchmarks.common import ROOT, corpus_path, markdown_table, write_result
from gptnano.files import atomic_write
from gptnano.numbers import PREFIXES

SUFFIXES = (".py", ".pyi", ".rst", ".md", ".txt")
UNITS = {**PREFIXES, "K": PREFIXES["k"]}  # sizes such as 100M, 1G, 10K or 10k


# ----- corpora ------------------------------------------------------------------
def source_files() -> list[Path]:
    """Text files of the Python installation, in a fixed order."""
    roots = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}
    files = []
    for root in sorted(roots):
        for folder, subfolders, names in os.walk(root):
            subfolders.sort()
            files += [Path(folder, n) for n in sorted(names) if n.endswith(SUFFIXES)]
    return files


def utf8_texts():
    """Contents of the source files that are valid UTF-8, forever (the list restarts)."""
    files = source_files()
    while True:
        for f in files:
            try:
                raw = f.read_bytes()
                raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            yield raw
        yield None  # marks one full pass


def build_corpus(label: str, folder: Path) -> tuple[Path, int]:
    """``folder/python-<label>.txt`` of exactly that many bytes (cut at a character
    boundary); returns its path and how many passes over the sources it took."""
    size = int(float(label[:-1]) * UNITS[label[-1]])
    path = folder / f"python-{label}.txt"
    passes_file = path.with_suffix(".passes")
    if path.is_file() and abs(path.stat().st_size - size) < 4 and passes_file.is_file():
        return path, int(passes_file.read_text())
    passes = 1

    def write(out) -> None:
        nonlocal passes
        written = 0
        for raw in utf8_texts():
            if raw is None:
                passes += 1
                continue
            piece = raw[: size - written]
            if len(piece) < len(raw):  # the last file: do not cut a character in two
                while piece and (piece[-1] & 0xC0) == 0x80:
                    piece = piece[:-1]
                if piece and piece[-1] >= 0xC0:
                    piece = piece[:-1]
            out.write(piece)
            written += len(piece)
            if written >= size or len(piece) < len(raw):
                break

    atomic_write(path, write)
    atomic_write(passes_file, str(passes))
    return path, passes


# ----- what a run measures about itself ------------------------------------------
def _status() -> dict[str, int]:
    """VmHWM (peak), VmRSS, RssAnon, RssFile of this process in kB (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


class Probe(L.Callback):
    """Added to the measured command: writes, per rank, the time of the first training
    step, the peak RSS once the data is ready and the peak RSS during training to
    $CORPUS_PROBE/rank<r>.json."""

    def setup(self, trainer, pl_module, stage) -> None:
        self.prepared = _status()  # called after the data module's prepare_data and setup

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = _status()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the training peak starts here
        self.first_step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_step is None:
            self.first_step = time.time()

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["CORPUS_PROBE"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"first_step": self.first_step, "prepared": self.prepared,
                                   "before_training": self.before, "training": _status()}))


# ----- one measured command --------------------------------------------------------
def run_fit(text: Path, folder: Path, name: str, steps: int, tokenizer: str, ddp: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"probe-{name}"
    probe.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "gptnano", "fit", "--config", str(ROOT / "configs" / "gpt.yaml"),
           "--data.path", str(text), "--data.tokenizer", tokenizer, "--trainer.precision", "32-true",
           "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--run_name", name,
           "--trainer.callbacks+=benchmarks.corpus_scale.Probe"]
    if ddp:
        cmd += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    env = {**os.environ, "CORPUS_PROBE": str(probe), "PYTHONPATH": str(ROOT)}
    env.pop("GPTNANO_DATA", None)
    print(f"$ (cd {folder} && {shlex.join(['python', *cmd[1:]])})", flush=True)
    launched = time.time()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    (folder / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))]
    seconds = {what: sum(float(s) for s in re.findall(rf"gptnano: {what} .*: [0-9.]+ MB in ([0-9.]+) s", proc.stderr))
               for what in ("scanned", "tokenized")}
    return {
        "first_step_s": round(ranks[0]["first_step"] - launched, 2),
        "peak_rss_preparing_mb": [round(r["prepared"]["VmHWM"] / 1024) for r in ranks],
        "peak_rss_training_mb": [round(r["training"]["VmHWM"] / 1024) for r in ranks],
        "rss_file_training_mb": [round(r["training"]["RssFile"] / 1024) for r in ranks],
        "scan_s": seconds["scanned"], "tokenize_s": seconds["tokenized"],
        "caches_on_disk": len(list((folder / "data" / "prepared").glob("*.bin"))),
        "log": [line for line in proc.stderr.splitlines() if line.startswith("gptnano:")],
    }


def measure(label: str, text: Path, work: Path, steps: int, tokenizer: str, ddp: bool, repeats: int) -> dict:
    """The cold run, then ``repeats`` warm runs (the fastest first step is reported: the
    machine is shared and slow moments only add time), then the same under DDP."""
    folder = work / f"{label}-{tokenizer}"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    size = text.stat().st_size
    cold = run_fit(text, folder, "cold", steps, tokenizer, ddp=False)
    warms = [run_fit(text, folder, f"warm{i}", steps, tokenizer, ddp=False) for i in range(repeats)]
    warm = min(warms, key=lambda r: r["first_step_s"])
    meta = json.loads(next((folder / "data" / "prepared").glob("*.json")).read_text())
    row = {
        "corpus": label, "MB": round(size / 1e6, 1), "vocab": len(meta["vocab"]) or 256, "dtype": meta["dtype"],
        "prepare MB/s": round(size / 1e6 / (cold["scan_s"] + cold["tokenize_s"]), 1) if cold["tokenize_s"] else "",
        "peak RSS preparing (MB)": cold["peak_rss_preparing_mb"][0],
        "peak RSS training (MB)": warm["peak_rss_training_mb"][0],
        "first step cold (s)": cold["first_step_s"], "first step warm (s)": warm["first_step_s"],
        "first step warm, every run (s)": [r["first_step_s"] for r in warms],
        "runs": {"cold": cold, "warm": warms},
    }
    if ddp:
        ddp_folder = folder / "ddp"
        ddp_cold = run_fit(text, ddp_folder, "ddp-cold", steps, tokenizer, ddp=True)
        ddp_warm = run_fit(text, ddp_folder, "ddp-warm", steps, tokenizer, ddp=True)
        row.update({
            "DDP peak RSS preparing per rank (MB)": "/".join(map(str, ddp_cold["peak_rss_preparing_mb"])),
            "DDP peak RSS training per rank (MB)": "/".join(map(str, ddp_warm["peak_rss_training_mb"])),
            "DDP first step cold / warm (s)": f"{ddp_cold['first_step_s']} / {ddp_warm['first_step_s']}",
            "DDP caches on disk": ddp_warm["caches_on_disk"],
        })
        row["runs"].update({"ddp-cold": ddp_cold, "ddp-warm": ddp_warm})
    print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1M", "10M", "100M", "1G"])
    ap.add_argument("--tokenizer", default="char", choices=["char", "byte"])
    ap.add_argument("--corpora", type=Path, default=Path("/tmp/corpora"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/corpus_scale"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="warm single-process runs per corpus")
    ap.add_argument("--no-ddp", dest="ddp", action="store_false")
    args = ap.parse_args(argv)

    texts = {"tinyshakespeare": (Path(corpus_path()), 1)}
    for label in args.sizes:
        texts[label] = build_corpus(label, args.corpora)
        print(f"corpus {texts[label][0]}: {texts[label][0].stat().st_size / 1e6:.1f} MB, "
              f"{texts[label][1]} pass(es) over the sources", flush=True)
    time.sleep(2.5)  # a file written just before its scan is scanned again next time (corpus.RACY_NS)
    rows = [measure(label, path, args.work, args.steps, args.tokenizer, args.ddp, args.repeats)
            for label, (path, _) in texts.items()]
    for row in rows:
        row["source passes"] = texts[row["corpus"]][1]
    columns = ["corpus", "MB", "vocab", "dtype", "prepare MB/s", "peak RSS preparing (MB)", "peak RSS training (MB)",
               "first step cold (s)", "first step warm (s)"]
    if args.ddp:
        columns += ["DDP peak RSS preparing per rank (MB)", "DDP peak RSS training per rank (MB)",
                    "DDP first step cold / warm (s)", "DDP caches on disk"]
    table = markdown_table(rows, columns)
    print(table)
    name = "corpus_scale" + ("" if args.tokenizer == "char" else f"_{args.tokenizer}")
    path = write_result(name, {"command": "python -m benchmarks.corpus_scale " + shlex.join(argv or sys.argv[1:]),
                               "rows": rows, "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
