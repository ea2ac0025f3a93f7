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

    python -m benchmarks.train_speed [--archs gpt rnn backpack cnn] [--steps 60] [--rounds 3] [--compile] [--matched]
                                     [--device cuda]

--compile adds gptnano segments trained through torch.compile (--model.compile true), with
the config's optimizer and with AdamW; compile time is not counted (the first steps are warm-up).
--matched adds the plain loop in ours' precision with fused AdamW, eager and compiled: against
ours with AdamW (compiled with --compile), it shows what Lightning itself costs a step.

--device cuda times the GPU configs (configs/gpu/<arch>.yaml, nanoGPT's "baby GPT" dimensions)
on the GPU, and the plain loop becomes what nanoGPT's train.py does there: torch.compile,
bf16 autocast, fused AdamW, pinned batches copied without blocking. On a GPU each segment is
timed as a whole between two synchronisations (a step's host-side time is not its GPU time).
"""

import argparse
import copy
import os
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, announce_machine, corpus_path, markdown_table, write_result
from gptnano.cli.lightning import GPTNanoCLI
from gptnano.data.windows import TrainWindows
from gptnano.hardware import measured_peak, peak_flops
from gptnano.numbers import median
from gptnano.train.steps import autocast_for

WARMUP = 5


# The gptnano segments: extra CLI arguments on top of configs/<arch>.yaml. The first two run by
# default, the compiled ones with --compile; --variants picks any (the last three pin by hand what
# the configs leave to the machine: the old bf16 CPU default, and fp32 with Muon or AdamW).
VARIANTS = {
    "ours": (),
    "ours AdamW": ("--model.optimizer", "adamw"),
    "ours compiled": ("--model.compile", "true"),
    "ours compiled AdamW": ("--model.compile", "true", "--model.optimizer", "adamw"),
    "ours bf16": ("--trainer.precision", "bf16-mixed", "--model.muon_dtype", "bfloat16"),
    "ours fp32": ("--trainer.precision", "32-true", "--model.muon_dtype", "float32"),
    "ours fp32 AdamW": ("--trainer.precision", "32-true", "--model.optimizer", "adamw"),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Clock:
    """End times of training steps, and the tokens/s they give. On the CPU every step is timed
    and each gives a rate (their median resists a busy moment); on a GPU the clock is read only
    after the warm-up and after the last step, each time after a synchronisation (a step's
    host-side time says nothing of its GPU time), and the stretch gives one rate."""

    def __init__(self, device: str, steps: int):
        self.device, self.steps, self.marks = device, steps, []

    def tick(self, step: int) -> None:
        """Step ``step`` (0-based) has just ended."""
        if self.device == "cuda" and step not in (WARMUP, self.steps - 1):
            return
        _sync(self.device)
        self.marks.append((step, time.perf_counter()))

    def rates(self, tokens_per_step: int) -> list[float]:
        marks = [(s, t) for s, t in self.marks if s >= WARMUP]
        return [tokens_per_step * (s1 - s0) / (t1 - t0) for (s0, t0), (s1, t1) in
                ([(marks[0], marks[-1])] if self.device == "cuda" else zip(marks, marks[1:]))]


class StepTimer(L.Callback):
    """The clock of gptnano's training steps (data, forward, backward, optimizer, hooks)."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.tick(trainer.global_step - 1)


def config(arch: str, device: str = "cpu") -> str:
    return str(ROOT / "configs" / ("gpu" if device == "cuda" else "") / f"{arch}.yaml")


def build_ours(arch: str, steps: int, folder: str, extra: tuple[str, ...] = (), device: str = "cpu"):
    accelerator = "gpu" if device == "cuda" else "cpu"
    cli = GPTNanoCLI(args=["--config", config(arch, device), "--trainer.accelerator", accelerator,
                           "--data.path", corpus_path(),
                           "--trainer.max_steps", str(steps),
                           "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                           "--checkpoint.dirpath", folder, "--checkpoint.last_every_n_steps", "0", *extra], run=False)
    return cli


def ours_segment(arch: str, steps: int, state: dict | None, extra: tuple[str, ...] = (), device: str = "cpu"):
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # logs and checkpoints go to the temporary folder
        try:
            cli = build_ours(arch, steps, folder, extra, device)
            if state is not None:
                cli.model.net.load_state_dict(state)
            clock = Clock(device, steps)
            cli.trainer.callbacks.append(StepTimer(clock))
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            os.chdir(here)
        return clock.rates(cli.datamodule.batch_size * cli.model.net.block_size), cli


def plain_setup(arch: str, batch_size: int | None = None, device: str = "cpu"):
    """The CLI-built model of configs/<arch>.yaml (configs/gpu/ for a GPU) and the plain loop's
    training windows (the config's batch size unless ``batch_size``); returns (cli, windows)."""
    probe = build_ours(arch, 1, tempfile.mkdtemp(), device=device)  # only its model and data are used
    data = probe.datamodule
    data.block_size = probe.model.net.block_size
    data.setup("fit")
    windows = TrainWindows(data.splits["train"], data.block_size, batch_size or data.batch_size, 0, 0, lambda: 0)
    return probe, windows


def plain_segment(net, windows: TrainWindows, steps: int, lr: float, device: str = "cpu", precision: str | None = None,
                  compiled: bool = False):
    """The loop a user writes by hand: AdamW, clip, step. On the CPU in fp32, as a user writes
    it; on a GPU as nanoGPT's train.py does: compiled, bf16 autocast, fused AdamW, batches
    pinned and copied without blocking, TF32 for what stays in fp32. ``precision`` (a Lightning
    precision, e.g. "bf16-mixed") runs it under that autocast with AdamW fused as LitLM fuses it,
    eager unless ``compiled``: the plain loop matched to one of ours, to see what Lightning costs."""
    gpu, matched = device == "cuda", precision is not None
    compiled = compiled or (gpu and not matched)
    precision = precision or ("bf16-mixed" if gpu else "32-true")
    net = net.to(device).train()
    # Matched: fused AdamW wherever LitLM fuses it (not under 16-mixed, whose loss scaling the loop lacks).
    fused = (not precision.startswith("16")) if matched else (gpu or None)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1, fused=fused)
    model = torch.compile(net) if compiled else net
    autocast = autocast_for(precision, device)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    clock = Clock(device, steps)
    for step in range(steps):
        x, y = windows.batch(step)
        if gpu:
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        with autocast:
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        clock.tick(step)
    return clock.rates(x.numel())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["gpt", "rnn", "backpack", "cnn"])
    ap.add_argument("--steps", type=int, default=60, help="steps per segment")
    ap.add_argument("--rounds", type=int, default=3, help="alternating plain/ours segments per architecture")
    ap.add_argument("--compile", action="store_true", help="also time ours compiled (--model.compile true), config optimizer and AdamW")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="gptnano segments to time (default: ours, "
                    "ours AdamW, and the compiled two with --compile); the first is the one MFU is given for")
    ap.add_argument("--matched", action="store_true", help="also time the plain loop in ours' precision with fused "
                    "AdamW, eager and compiled, against ours AdamW (compiled with --compile): what Lightning costs")
    ap.add_argument("--name", default="train_speed", help="result file: benchmarks/results/NAME.json")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the GPU configs on the GPU, against a compiled bf16 plain loop")
    args = ap.parse_args()
    announce_machine()
    L.seed_everything(0, verbose=False)
    device = args.device

    peak32 = measured_peak(torch.float32, device)
    peak16 = measured_peak(torch.bfloat16, device)
    print(f"matmul peak here: fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s")
    rows = []
    for arch in args.archs:
        probe, windows = plain_setup(arch, device=device)
        net0 = probe.model.net
        plain_net = copy.deepcopy(net0)
        state = copy.deepcopy(net0.state_dict())
        names = args.variants or ["ours", "ours AdamW"] + (["ours compiled", "ours compiled AdamW"] if args.compile else [])
        variants = {name: VARIANTS[name] for name in names}
        if net0.compile_refusal:  # `fit` refuses --model.compile true for it (e.g. the RNN): say why, time the rest
            print(f"{arch}: not compiled: {net0.compile_refusal}", flush=True)
            variants = {name: extra for name, extra in variants.items() if "--model.compile" not in extra}
            if not variants:
                continue
        precision = str(probe.trainer.precision)  # as every "ours" segment resolves it
        lr = probe.model.hparams.learning_rate
        matched = {"plain matched": False, "plain matched compiled": True} if args.matched else {}
        if net0.compile_refusal:
            matched.pop("plain matched compiled", None)
        plain, speeds, plain_speeds = [], {name: [] for name in variants}, {name: [] for name in matched}
        for _ in range(args.rounds):
            plain += plain_segment(plain_net, windows, args.steps, lr, device)
            for name, compiled in matched.items():
                plain_speeds[name] += plain_segment(copy.deepcopy(net0), windows, args.steps, lr, device, precision,
                                                    compiled)
            for name, extra in variants.items():
                speeds[name] += ours_segment(arch, args.steps, state, extra, device)[0]
        peak = peak_flops(device, precision)[0]
        plain_peak = peak_flops(device, "bf16-mixed" if device == "cuda" else "32-true")[0]  # the plain loop's
        fpt = net0.flops_per_token()
        row = {"arch": arch, "params": net0.num_params(), "precision": precision,
               "optimizer": probe.model.hparams.optimizer, "plain tok/s": round(median(plain))}
        for name, segment in speeds.items():
            row[f"{name} tok/s"] = round(median(segment))
            row[f"{name}/plain"] = round(median(segment) / median(plain), 2)
        for name, segment in plain_speeds.items():  # ours AdamW against the plain loop at its precision
            ours = speeds.get("ours compiled AdamW" if name.endswith("compiled") else "ours AdamW")
            row[f"{name} tok/s"] = round(median(segment))
            if ours:
                row[f"ours/{name}"] = round(median(ours) / median(segment), 2)
        row["MFU plain"] = f"{100 * median(plain) * fpt / plain_peak:.1f}%"
        first = next(iter(speeds))  # the first variant timed: the one MFU is given for
        row[f"MFU {first}"] = f"{100 * median(speeds[first]) * fpt / peak:.1f}%"
        rows.append(row)
        print(f"{arch}: plain {row['plain tok/s']} tok/s, "
              + ", ".join(f"{name} {row[f'{name} tok/s']} tok/s ({row[f'{name}/plain']}x)" for name in speeds)
              + f", precision {precision}, MFU {row[f'MFU {first}']}", flush=True)
    cols = list(dict.fromkeys(key for row in rows for key in row))  # a refused compile leaves columns out of its row
    print()
    print(markdown_table(rows, cols))
    path = write_result(args.name, {"device": device, "peak_flops": {"fp32": peak32, "bf16": peak16}, "steps": args.steps,
                                        "rounds": args.rounds, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
