"""Muon's step at nanoGPT's CPU recipe size: its orthogonalisation one matrix at a time, batched by
shape, and batched on the Gram matrix, with fp32 and with bf16 Newton-Schulz, and its share of the step.

The GPT of nanoGPT's shakespeare_char CPU recipe (4 layers x 4 heads x 128 wide, context 64,
batch 12) has 16 matrices for Muon in three shapes once c_proj's [128, 512] joins c_fc's
transposed: 4 x [128, 384], 4 x [128, 128], 8 x [128, 512]. Variants of the optimizer:

  one by one    every matrix orthogonalised alone, by the plain iteration
  batched       one stack per shape, the plain iteration (gptnano before the Gram form)
  batched Gram  one stack per shape, the Gram form where it needs fewer FLOPs (gptnano now)
  AdamW         torch's fused AdamW on every parameter: the step without Muon

Each trains real steps (forward, backward, gradient clipping, optimizer step, from the same
weights and batches), timed one by one; the variants take turns in short segments, so a busy
moment of a shared machine slows them alike, and each gets the median of its steps. The
Newton-Schulz time is measured inside those same steps (``orthogonalize`` wrapped in a clock).
fp32 Newton-Schulz runs with an fp32 forward, as a CPU without fast bf16 trains; bf16 with bf16
autocast, as one with fast bf16 does (what gptnano chooses on each).

A second table times the orthogonalisation alone on the recipe's three stacks of random
matrices, the three arrangements in turns, best and median of ``--ns_repeats``: the best time
is what the arithmetic costs when nothing else runs, even on a busy machine.

    python -m benchmarks.muon_speed [--steps 5] [--rounds 20] [--batch_size 12] [--threads N]
                                    [--device cuda] [--name muon_speed]

Writes benchmarks/results/NAME.json and NAME.md, each naming the CPU it ran on.
"""

import argparse
import copy
import time

import torch

from benchmarks.common import RESULTS, announce_machine, corpus_path, markdown_table, write_result
from gptnano import numbers
from gptnano.data.tokenizer import CharTokenizer
from gptnano.data.windows import TrainWindows
from gptnano.files import atomic_write
from gptnano.hardware import device_sync
from gptnano.models import GPT
from gptnano.numbers import median
from gptnano.train import optim
from gptnano.train.steps import autocast_for, next_token_loss

RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)  # nanoGPT's shakespeare_char on a CPU
VARIANTS = ("one by one", "batched", "batched Gram", "AdamW")
NS = {"float32": "32-true", "bfloat16": "bf16-mixed"}  # Newton-Schulz dtype -> the precision trained in


class NSClock:
    """Seconds spent in ``optim.orthogonalize`` since the last ``take()`` (on a GPU, between
    synchronisations: the time of its kernels)."""

    def __init__(self, sync):
        self.seconds, self.inner, self.sync = 0.0, optim.orthogonalize, sync

    def __call__(self, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def build_optimizer(net: GPT, variant: str, ns_dtype: torch.dtype) -> torch.optim.Optimizer:
    """LitLM's optimizer for ``net`` (Muon lr 0.02 on the hidden matrices, AdamW 1e-3 with weight
    decay 0.1 on the rest), arranged as ``variant`` says."""
    if variant == "AdamW":
        return torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    groups = optim.param_groups(net, muon=True, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.0)
    if variant == "one by one":  # a group per matrix: each orthogonalised alone
        (muon,) = [g for g in groups if g.get("muon")]
        groups = [g for g in groups if not g.get("muon")] + [{**muon, "params": [p]} for p in muon["params"]]
    return optim.MuonAdamW(groups, lr=1e-3, betas=(0.9, 0.99), ns_dtype=ns_dtype, fused=True,
                           gram=None if variant == "batched Gram" else False)


def trainer(net: GPT, opt: torch.optim.Optimizer, precision: str, windows: TrainWindows, device: str):
    """One training step of ``net`` per call, on the next batch of ``windows``."""
    step = 0

    def train_step() -> None:
        nonlocal step
        x, y = (t.to(device) for t in windows.batch(step))
        step += 1
        with autocast_for(precision, device):
            loss = next_token_loss(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train_step


def measure(ns_name: str, windows: TrainWindows, vocab_size: int, steps: int, rounds: int, device: str) -> list[dict]:
    """Median step and Newton-Schulz times of every variant with ``ns_name`` Newton-Schulz, interleaved."""
    torch.manual_seed(0)
    net0 = GPT(vocab_size=vocab_size, **RECIPE).to(device)
    train = {}
    for variant in VARIANTS:
        net = copy.deepcopy(net0)
        opt = build_optimizer(net, variant, getattr(torch, ns_name))
        train[variant] = trainer(net, opt, NS[ns_name], windows, device)
    sync = device_sync(device)
    clock = NSClock(sync)
    optim.orthogonalize = clock  # MuonAdamW looks the function up at every step
    step_s, ns_s = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    try:
        for variant in VARIANTS:  # warm-up: first-touch allocations, kernel choices
            for _ in range(3):
                train[variant]()
        for _ in range(rounds):
            for variant in VARIANTS:
                for _ in range(steps):
                    clock.take()
                    sync()
                    start = time.perf_counter()
                    train[variant]()
                    sync()
                    step_s[variant].append(time.perf_counter() - start)
                    ns_s[variant].append(clock.take())
    finally:
        optim.orthogonalize = clock.inner
    rows = []
    base = {v: median(step_s[v]) for v in VARIANTS}
    for variant in VARIANTS:
        step_ms, ns_ms = 1e3 * base[variant], 1e3 * median(ns_s[variant])
        rows.append({"Newton-Schulz": ns_name, "precision": NS[ns_name], "variant": variant,
                     "step ms": round(step_ms, 2), "NS ms": round(ns_ms, 2),
                     "NS share": f"{100 * ns_ms / step_ms:.0f}%",
                     "step vs batched": round(base["batched"] / base[variant], 2),
                     "steps": len(step_s[variant])})
    return rows


def recipe_stacks(device: str) -> list[torch.Tensor]:
    """Random stand-ins for the recipe's Nesterov updates, stacked as the optimizer stacks them."""
    torch.manual_seed(0)
    net = GPT(vocab_size=65, **RECIPE)
    shapes = sorted({tuple(sorted(p.shape)) for p in optim.muon_matrices(net)})
    count = {s: sum(tuple(sorted(p.shape)) == s for p in optim.muon_matrices(net)) for s in shapes}
    return [torch.randn(count[s], *s, device=device) for s in shapes]


def measure_ns_alone(ns_name: str, device: str, repeats: int) -> list[dict]:
    """Best and median time of orthogonalising the recipe's stacks: one matrix at a time (plain),
    batched (plain), batched with the Gram form where it saves work; in turns."""
    dtype, sync = getattr(torch, ns_name), device_sync(device)
    stacks = recipe_stacks(device)
    ways = {
        "one by one": lambda: [optim.orthogonalize(m, dtype=dtype, gram=False) for s in stacks for m in s],
        "batched": lambda: [optim.orthogonalize(s, dtype=dtype, gram=False) for s in stacks],
        "batched Gram": lambda: [optim.orthogonalize(s, dtype=dtype) for s in stacks],
    }
    times = {way: [] for way in ways}
    for run in ways.values():
        run()
    for _ in range(repeats):
        for way, run in ways.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[way].append(time.perf_counter() - start)
    best = {way: min(t) for way, t in times.items()}
    return [{"Newton-Schulz": ns_name, "variant": way, "best ms": round(1e3 * best[way], 2),
             "median ms": round(1e3 * median(times[way]), 2), "best vs batched": round(best["batched"] / best[way], 2)}
            for way in ways]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="steps per segment")
    ap.add_argument("--rounds", type=int, default=20, help="segments per variant, taken in turns")
    ap.add_argument("--batch_size", type=int, default=12, help="nanoGPT's CPU recipe: 12")
    ap.add_argument("--dtypes", nargs="+", default=list(NS), choices=list(NS), help="Newton-Schulz dtypes")
    ap.add_argument("--name", default="muon_speed", help="result files: benchmarks/results/NAME.json and .md")
    ap.add_argument("--ns_repeats", type=int, default=60, help="timings of the orthogonalisation alone")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); on a machine other processes "
                    "share, 1 keeps a thread from waiting for a core another process holds")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    announce_machine()
    text = open(corpus_path(), encoding="utf-8").read()
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    windows = TrainWindows(ids[: int(0.9 * len(ids))], RECIPE["block_size"], args.batch_size, 0, 0, lambda: 0)
    rows, alone = [], []
    for ns_name in args.dtypes:
        alone += measure_ns_alone(ns_name, args.device, args.ns_repeats)
        for row in alone[-3:]:
            print(f"{ns_name:9s} {row['variant']:13s} orthogonalisation alone: best {row['best ms']:6.2f} ms, "
                  f"median {row['median ms']:6.2f} ms, x{row['best vs batched']} vs batched", flush=True)
        rows += measure(ns_name, windows, len(tokenizer), args.steps, args.rounds, args.device)
        for row in rows[-len(VARIANTS):]:
            print(f"{ns_name:9s} {row['variant']:13s} step {row['step ms']:7.2f} ms  Newton-Schulz "
                  f"{row['NS ms']:6.2f} ms ({row['NS share']})  x{row['step vs batched']} vs batched", flush=True)
    table = markdown_table(rows, ["Newton-Schulz", "precision", "variant", "step ms", "NS ms", "NS share",
                                  "step vs batched"])
    table_alone = "\n".join(numbers.markdown_table(alone, ["Newton-Schulz", "variant", "best ms", "median ms",
                                                             "best vs batched"]))
    print()
    print(table)
    print()
    print(table_alone)
    command = " ".join(["python -m benchmarks.muon_speed", f"--steps {args.steps} --rounds {args.rounds}",
                        f"--batch_size {args.batch_size} --ns_repeats {args.ns_repeats}",
                        *([f"--threads {args.threads}"] if args.threads else []),
                        *([f"--device {args.device}"] if args.device != "cpu" else []),
                        *([f"--dtypes {' '.join(args.dtypes)}"] if args.dtypes != list(NS) else [])])
    path = write_result(args.name, {"command": command, "device": args.device,
                                    "model": {**RECIPE, "batch_size": args.batch_size}, "steps": args.steps,
                                    "rounds": args.rounds, "rows": rows, "orthogonalisation_alone": alone})
    atomic_write(RESULTS / f"{args.name}.md", "\n".join([
        f"# Muon's step: one matrix at a time, batched, batched on the Gram matrix ({args.name})", "",
        f"`{command}` on {args.device}: GPT {RECIPE['n_layer']} layers x {RECIPE['n_head']} heads x "
        f"{RECIPE['n_embd']}, context {RECIPE['block_size']}, batch {args.batch_size}; median of "
        f"{args.steps * args.rounds} timed training steps per variant, the variants interleaved. NS: the "
        "Newton-Schulz orthogonalisation inside those steps.", "", table, "",
        f"The orthogonalisation alone, the recipe's stacks of random matrices ({args.ns_repeats} timings "
        "each, in turns; the best is the arithmetic's cost on an idle machine):", "", table_alone, ""]))
    print(f"\nwrote {path} and {args.name}.md")


if __name__ == "__main__":
    main()
