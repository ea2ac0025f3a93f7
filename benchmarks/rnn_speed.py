"""Training speed of gptnano's hand-written Elman recurrence against torch.nn.RNN.

    flock /tmp/gptnano-cpu.lock python benchmarks/rnn_speed.py [--steps 60] [--warmup 10]

What is compared, per shape: a stack of ``L`` Elman layers (input projection +
recurrence, exactly what ``nn.RNN(E, H, num_layers=L, batch_first=True)``
computes), loaded with the same weights. One training step is forward, loss,
backward and an AdamW step. "ours" is ``ElmanLayer(fast=True)`` (hand-written
BPTT), "reference" the plain autograd loop (``fast=False``), "builtin" nn.RNN.
The three are stepped in turn (the order rotates every round) so a busy
machine slows them alike; the median over the steps after warm-up is reported.
Prints one line per shape and a markdown table, and writes
``benchmarks/results/rnn_speed.json``.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from gptnano.files import atomic_write
from gptnano.hardware import machine_info, machine_line
from gptnano.models.rnn import ElmanLayer
from gptnano.numbers import markdown_table

# (E input width, H hidden size, L layers, B batch, T sequence length)
SHAPES = [
    (128, 256, 2, 12, 64),  # the brief's base shape: nanoGPT's CPU batch and context
    (128, 512, 2, 12, 64),  # wider hidden state
    (128, 256, 2, 12, 256),  # longer sequence
    (128, 160, 1, 12, 64),  # one layer as in configs/rnn.yaml
]
RESULTS = Path(__file__).resolve().parent / "results" / "rnn_speed.json"


class ElmanStack(nn.Module):
    """L of our Elman layers stacked like nn.RNN's layers (top layer's states out)."""

    def __init__(self, E: int, H: int, L: int, fast: bool):
        super().__init__()
        self.layers = nn.ModuleList(ElmanLayer(E if i == 0 else H, H, fast=fast) for i in range(L))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x, _ = layer(x)
        return x

    @torch.no_grad()
    def load_from(self, ref: nn.RNN) -> None:
        for i, layer in enumerate(self.layers):
            layer.w_x.weight.copy_(getattr(ref, f"weight_ih_l{i}"))
            layer.w_x.bias.copy_(getattr(ref, f"bias_ih_l{i}"))
            layer.w_h.weight.copy_(getattr(ref, f"weight_hh_l{i}"))
            layer.w_h.bias.copy_(getattr(ref, f"bias_hh_l{i}"))


class Builtin(nn.Module):
    def __init__(self, E: int, H: int, L: int):
        super().__init__()
        self.rnn = nn.RNN(E, H, num_layers=L, nonlinearity="tanh", batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def bench_shape(E: int, H: int, L: int, B: int, T: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    builtin = Builtin(E, H, L)
    models = {"ours": ElmanStack(E, H, L, fast=True), "reference": ElmanStack(E, H, L, fast=False), "builtin": builtin}
    models["ours"].load_from(builtin.rnn)
    models["reference"].load_from(builtin.rnn)
    x = torch.randn(B, T, E)
    with torch.no_grad():  # same weights, same numbers: otherwise the timing compares different work
        y = builtin(x)
        for name in ("ours", "reference"):
            torch.testing.assert_close(models[name](x), y, rtol=1e-5, atol=1e-5)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    def train_step(name: str) -> float:
        start = time.perf_counter()
        loss = models[name](x).square().mean()
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        return time.perf_counter() - start

    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotate who goes first
            dt = train_step(name)
            if i >= warmup:
                times[name].append(dt)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    # Quartiles show how noisy the machine was: a wide spread means a busy machine.
    quartiles = {name: [round(1e3 * q, 3) for q in statistics.quantiles(t, n=4)] for name, t in times.items()}
    tok_s = {name: B * T / (m / 1e3) for name, m in ms.items()}
    return dict(E=E, H=H, L=L, B=B, T=T, median_ms=ms, quartiles_ms=quartiles, tokens_per_s=tok_s,
                ratio=tok_s["ours"] / tok_s["builtin"])


def markdown(rows: list[dict]) -> str:
    columns = ["E", "H", "layers", "B", "T", "ours tok/s", "reference tok/s", "nn.RNN tok/s", "ours/builtin"]
    table = []
    for r in rows:
        t = r["tokens_per_s"]
        cells = [r["E"], r["H"], r["L"], r["B"], r["T"], f"{t['ours']:,.0f}", f"{t['reference']:,.0f}",
                 f"{t['builtin']:,.0f}", f"{r['ratio']:.2f}x"]
        table.append(dict(zip(columns, cells)))
    return "\n".join(markdown_table(table, columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant and shape")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    print(f"machine: {machine_line()}; load average {load_before:.2f}")
    rows = []
    for shape in SHAPES:
        r = bench_shape(*shape, steps=args.steps, warmup=args.warmup)
        t = r["tokens_per_s"]
        print(
            f"E={r['E']} H={r['H']} L={r['L']} B={r['B']} T={r['T']}: ours {t['ours']:,.0f} tok/s, "
            f"reference {t['reference']:,.0f} tok/s, nn.RNN {t['builtin']:,.0f} tok/s, ours/builtin {r['ratio']:.2f}x",
            flush=True,
        )
        rows.append(r)
    print()
    print(f"Measured on: {machine_line()}\n")
    print(markdown(rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        benchmark="rnn_speed",
        what="training step (forward + backward + AdamW) of an L-layer Elman stack, median ms",
        machine=machine_info(),
        load_average_before=load_before,
        load_average_after=os.getloadavg()[0],
        steps=args.steps,
        warmup=args.warmup,
        results=rows,
    )
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
