"""Training throughput: gptnano's own training path vs a minimal plain-PyTorch loop.

For each architecture (dimensions from configs/<arch>.yaml) this alternates
segments of
  * plain: the same network in fp32, a hand-written loop (AdamW, grad clipping,
    batches from the same windows) -- what a user would write instead;
  * ours:  `gptnano fit --config configs/<arch>.yaml` as built by the CLI (Lightning
    Trainer, its precision, callbacks and all), timed between consecutive steps,
    once with the optimizer the config names (Muon + AdamW) and once with AdamW
    alone, the plain loop's optimizer (Muon buys fewer steps to a given loss with
    extra work per step: benchmarks/time_to_loss.py measures what that nets);
and reports median tokens/s of each, the ratios, and model FLOPs utilisation
against matrix-product peaks measured here. Writes benchmarks/results/train_speed.json.

    python -m benchmarks.train_speed [--archs gpt rnn backpack cnn] [--steps 60] [--rounds 3] [--compile]

--compile adds gptnano segments trained through torch.compile (--model.compile true), with
the config's optimizer and with AdamW; compile time is not counted (the first steps are warm-up).
"""

import argparse
import copy
import os
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, corpus_path, markdown_table, measure_peak_flops, median, write_result
from gptnano.cli import GPTNanoCLI
from gptnano.data import TrainWindows

WARMUP = 5


# The gptnano segments: extra CLI arguments on top of configs/<arch>.yaml. The last two
# run only with --compile.
VARIANTS = {
    "ours": (),
    "ours AdamW": ("--model.optimizer", "adamw"),
    "ours compiled": ("--model.compile", "true"),
    "ours compiled AdamW": ("--model.compile", "true", "--model.optimizer", "adamw"),
}


class StepTimer(L.Callback):
    """Wall time between consecutive training steps (data, forward, backward, optimizer, hooks)."""

    def __init__(self):
        self.times = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())


def build_ours(arch: str, steps: int, folder: str, extra: tuple[str, ...] = ()):
    cli = GPTNanoCLI(args=["--config", str(ROOT / "configs" / f"{arch}.yaml"), "--data.path", corpus_path(),
                           "--trainer.max_steps", str(steps),
                           "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                           "--checkpoint.dirpath", folder, "--checkpoint.last_every_n_steps", "0", *extra], run=False)
    return cli


def ours_segment(arch: str, steps: int, state: dict | None, extra: tuple[str, ...] = ()):
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # logs and checkpoints go to the temporary folder
        cli = build_ours(arch, steps, folder, extra)
        if state is not None:
            cli.model.net.load_state_dict(state)
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
        os.chdir(here)
        t = timer.times[WARMUP:]
        tokens = cli.datamodule.batch_size * cli.model.net.block_size
        return [tokens / (b - a) for a, b in zip(t, t[1:])], cli


def plain_setup(arch: str, batch_size: int | None = None):
    """The CLI-built model of configs/<arch>.yaml and the plain loop's training windows
    (the config's batch size unless ``batch_size``); returns (cli, windows)."""
    probe = build_ours(arch, 1, tempfile.mkdtemp())  # only its model and data are used
    data = probe.datamodule
    data.block_size = probe.model.net.block_size
    data.setup("fit")
    windows = TrainWindows(data.splits["train"], data.block_size, batch_size or data.batch_size, 0, 0, lambda: 0)
    return probe, windows


def plain_segment(net, windows: TrainWindows, steps: int, lr: float):
    """The loop a user writes by hand: fp32, AdamW, clip, step."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    net.train()
    times = []
    for step in range(steps):
        x, y = windows.batch(step)
        logits = net(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter())
    t = times[WARMUP:]
    return [x.numel() / (b - a) for a, b in zip(t, t[1:])]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["gpt", "rnn", "backpack", "cnn"])
    ap.add_argument("--steps", type=int, default=60, help="steps per segment")
    ap.add_argument("--rounds", type=int, default=3, help="alternating plain/ours segments per architecture")
    ap.add_argument("--compile", action="store_true", help="also time ours compiled (--model.compile true), config optimizer and AdamW")
    ap.add_argument("--name", default="train_speed", help="result file: benchmarks/results/NAME.json")
    args = ap.parse_args()
    L.seed_everything(0, verbose=False)

    peak32 = measure_peak_flops(torch.float32)
    peak16 = measure_peak_flops(torch.bfloat16)
    print(f"matmul peak here: fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s")
    rows = []
    for arch in args.archs:
        probe, windows = plain_setup(arch)
        net0 = probe.model.net
        plain_net = copy.deepcopy(net0)
        state = copy.deepcopy(net0.state_dict())
        variants = dict(VARIANTS if args.compile else list(VARIANTS.items())[:2])
        plain, speeds = [], {name: [] for name in variants}
        for _ in range(args.rounds):
            plain += plain_segment(plain_net, windows, args.steps, probe.model.hparams.learning_rate)
            for name, extra in variants.items():
                speeds[name] += ours_segment(arch, args.steps, state, extra)[0]
        precision = str(probe.trainer.precision)  # the config's, as in every "ours" segment
        peak = peak16 if "bf16" in precision else peak32
        fpt = net0.flops_per_token()
        row = {"arch": arch, "params": net0.num_params(), "precision": precision,
               "optimizer": probe.model.hparams.optimizer, "plain tok/s": round(median(plain))}
        for name, segment in speeds.items():
            row[f"{name} tok/s"] = round(median(segment))
            row[f"{name}/plain"] = round(median(segment) / median(plain), 2)
        row["MFU plain (fp32 peak)"] = f"{100 * median(plain) * fpt / peak32:.1f}%"
        row["MFU ours"] = f"{100 * median(speeds['ours']) * fpt / peak:.1f}% of {'bf16' if peak is peak16 else 'fp32'}"
        rows.append(row)
        print(f"{arch}: plain {row['plain tok/s']} tok/s, "
              + ", ".join(f"{name} {row[f'{name} tok/s']} tok/s ({row[f'{name}/plain']}x)" for name in speeds)
              + f", precision {precision}, {row['MFU ours']}", flush=True)
    cols = list(rows[0])
    print()
    print(markdown_table(rows, cols))
    path = write_result(args.name, {"peak_flops": {"fp32": peak32, "bf16": peak16}, "steps": args.steps,
                                        "rounds": args.rounds, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
