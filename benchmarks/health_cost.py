"""What TrainingHealth (gptnano/train/health.py) costs a training run, at its default interval.

For each architecture (configs/<arch>.yaml, trained as `gptnano fit` builds it: the CLI's
Trainer, precision, optimizer and callbacks) this alternates segments without and with the
callback, from the same weights, and times every step. A segment runs WARMUP steps, then
``k * every_n_steps`` timed ones, which hold exactly k measured steps (the callback's cost
falls on those alone: a per-step median would never see it). Reported, per architecture:

  * cost: (time of the timed steps with the callback) / (without) - 1, per round, the median
    over rounds: the number the goal (<= 5 %) is about, and as noisy as the machine;
  * extra per measured step: a measured step's time less the median step of its own segment,
    and what that comes to spread over every_n_steps steps (a steadier estimate of the same cost);
  * step ms: the median step without the callback, and with it on the steps it does not measure
    (the same but for noise);
each in wall-clock time and in the process's CPU time (all its threads): on a machine other
processes share, wall-clock steps vary many-fold from one moment to the next, and CPU time
much less, so read the CPU columns there. Busy enough, even CPU time swells (threads of one
operation spin waiting for a sibling that is not running): ``--threads 1`` then.

    python -m benchmarks.health_cost [--archs gpt rnn] [--measured 2] [--rounds 3] [--every 50] [--threads N]

Writes benchmarks/results/health_cost.json and .md, headed by the machine they were measured on.
"""

import argparse
import os
import shlex
import sys
import tempfile
import time

import lightning as L
import torch

from benchmarks.common import RESULTS, announce_machine, markdown_table, write_result
from benchmarks.train_speed import build_ours
from gptnano.files import atomic_write
from gptnano.numbers import median
from gptnano.train.health import TrainingHealth

WARMUP = 5  # untimed steps at the start of a segment (first-call allocations, the bf16 probe's caches)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class StepClock(L.Callback):
    """When every training step ended (data, forward, backward, optimizer and every callback),
    on each of CLOCKS: {clock: {step: seconds}}."""

    def __init__(self):
        self.ends: dict[str, dict[int, float]] = {name: {} for name in CLOCKS}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, clock in CLOCKS.items():
            self.ends[name][trainer.global_step - 1] = clock()  # the step that has just ended


def segment(arch: str, steps: int, state: dict | None, health: TrainingHealth | None, folder: str):
    """Train ``steps`` steps of configs/<arch>.yaml from ``state``; returns ({clock: {step: its
    duration in seconds}} for the steps after the warm-up, the CLI)."""
    here = os.getcwd()
    os.chdir(folder)  # logs and checkpoints go to the temporary folder
    try:
        cli = build_ours(arch, steps, folder)
        if state is not None:
            cli.model.net.load_state_dict(state)
        clock = StepClock()
        cli.trainer.callbacks.extend([health, clock] if health else [clock])  # the clock last: it sees the hooks' work
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        os.chdir(here)
    durations = {name: {s: ends[s] - ends[s - 1] for s in range(WARMUP, steps) if s - 1 in ends}
                 for name, ends in clock.ends.items()}
    return durations, cli


def summary(offs: list[dict], ons: list[dict], every: int, clock: str) -> dict:
    """The columns of one clock from each round's step durations without (``offs``) and with (``ons``)."""
    ratios, step_ms, step_ms_on, extras = [], [], [], []
    for off, on in zip(offs, ons):
        ratios.append(sum(on.values()) / sum(off.values()))
        plain = median([t for s, t in on.items() if s % every])  # its steps that measure nothing
        step_ms.append(1e3 * median(list(off.values())))
        step_ms_on.append(1e3 * plain)
        extras += [1e3 * (t - plain) for s, t in on.items() if s % every == 0]
    return {f"{clock} step ms": round(median(step_ms), 1), f"{clock} step ms with": round(median(step_ms_on), 1),
            f"{clock} cost": f"{100 * (median(ratios) - 1):+.1f}%",
            f"{clock} cost per round": " ".join(f"{100 * (r - 1):+.1f}%" for r in ratios),
            f"{clock} extra ms per measured step": round(median(extras), 1),
            f"{clock} spread over the interval": f"{100 * median(extras) / every / median(step_ms):.2f}%"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["gpt", "rnn"])
    ap.add_argument("--every", type=int, default=TrainingHealth().every_n_steps,
                    help="the callback's every_n_steps (default: its default)")
    ap.add_argument("--measured", type=int, default=2, help="measured steps per timed segment")
    ap.add_argument("--rounds", type=int, default=3, help="alternating without/with segments per architecture")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--note", default="", help="a line for the results (e.g. that other work shared the machine)")
    ap.add_argument("--name", default="health_cost", help="result files: benchmarks/results/NAME.json and .md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    announce_machine()
    L.seed_everything(0, verbose=False)
    if WARMUP >= args.every:
        raise SystemExit(f"--every must be above the {WARMUP} warm-up steps")
    steps = WARMUP + args.measured * args.every
    rows = []
    for arch in args.archs:
        state, offs, ons = None, [], []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as folder:
                off, cli = segment(arch, steps, state, None, folder)
                state = state or {k: v.clone() for k, v in cli.model.net.state_dict().items()}
            with tempfile.TemporaryDirectory() as folder:
                on, _ = segment(arch, steps, state, TrainingHealth(every_n_steps=args.every), folder)
            offs.append(off)
            ons.append(on)
        row = {"arch": arch, "precision": str(cli.trainer.precision), "every_n_steps": args.every}
        for clock in CLOCKS:
            row.update(summary([o[clock] for o in offs], [o[clock] for o in ons], args.every, clock))
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    table = markdown_table(rows, list(rows[0]))
    print()
    print(table)
    argv = sys.argv[1:]
    if "--note" in argv:  # the note is written out on its own
        argv = argv[: argv.index("--note")] + argv[argv.index("--note") + 2 :]
    command = shlex.join(["python", "-m", "benchmarks.health_cost", *argv])
    payload = {"command": command, "note": args.note, "steps_per_segment": steps, "warmup": WARMUP, "measured_per_segment": args.measured,
               "rounds": args.rounds, "rows": rows}
    path = write_result(args.name, payload)
    note = f"{args.note}\n\n" if args.note else ""
    atomic_write(RESULTS / f"{args.name}.md", f"# TrainingHealth's cost\n\n`{command}`\n\n{note}{table}\n")
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
