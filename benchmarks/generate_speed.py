"""Generation throughput: each architecture's cache vs the naive sampler.

The naive sampler re-runs the model over the whole (cropped) context for every
new token; the cached one (KV cache for GPT and Backpack, hidden state for the
RNN, activation queues for the CNN) does one step per token. Both generate
``--tokens`` tokens greedily from a one-character prompt at context
``--block_size``; the script checks that the two produce the same text and
the same logits (float32 rounding), then reports tokens/s and the speed-up.
Writes benchmarks/results/generate_speed.json.

    python -m benchmarks.generate_speed [--archs gpt rnn backpack cnn] [--block_size 256] [--tokens 255]
"""

import argparse
import time

import torch

from benchmarks.common import announce_machine, build_net, markdown_table, write_result
from gptnano.numbers import median
from gptnano.sampling import generate, generate_naive

# The CNN needs 8 dilated layers (1..128) for a receptive field of 256.
OVERRIDES = {"cnn": {"n_layer": 8}}


@torch.no_grad()
def max_logit_gap(net, idx, steps: int) -> float:
    """Largest |cached - naive| logit difference over ``steps`` greedy steps."""
    logits, cache = net.forward_cached(idx)
    history, gap = idx, 0.0
    for _ in range(steps):
        gap = max(gap, (logits - net.naive_last_logits(history)).abs().max().item())
        nxt = logits.argmax(-1, keepdim=True)
        history = torch.cat([history, nxt], 1)
        logits, cache = net.forward_cached(nxt, cache)
    return gap


def timed(fn, repeats: int):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["gpt", "rnn", "backpack", "cnn"])
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=255, help="new tokens (prompt is 1 token)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    announce_machine()
    torch.manual_seed(0)
    rows = []
    for arch in args.archs:
        net = build_net(arch, vocab_size=65, block_size=args.block_size, **OVERRIDES.get(arch, {})).eval()
        idx = torch.zeros(1, 1, dtype=torch.long)
        gap = max_logit_gap(net, idx, min(args.tokens, 64))
        cached, t_cached = timed(lambda: generate(net, idx, args.tokens, temperature=0), args.repeats)
        naive, t_naive = timed(lambda: generate_naive(net, idx, args.tokens, temperature=0), args.repeats)
        same = torch.equal(cached, naive)
        row = {"arch": arch, "cached tok/s": round(args.tokens / t_cached), "naive tok/s": round(args.tokens / t_naive),
               "speed-up": round(t_naive / t_cached, 1), "same greedy text": same, "max logit gap": f"{gap:.1e}"}
        rows.append(row)
        print(f"{arch}: cached {row['cached tok/s']} tok/s, naive {row['naive tok/s']} tok/s, "
              f"{row['speed-up']}x, identical={same}, max |logit diff| {gap:.1e}", flush=True)
    print()
    print(markdown_table(rows, list(rows[0])))
    path = write_result("generate_speed", {"block_size": args.block_size, "tokens": args.tokens, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
