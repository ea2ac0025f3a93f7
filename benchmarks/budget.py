"""The headline comparison of the README: every architecture of configs/ trained for the same
model-FLOP budget, over 3 seeds, by `gptnano compare` (each run a real `gptnano fit`).

The default budget, 1.5e13 FLOPs (tokens x each architecture's flops_per_token), is what about
5 minutes of training buy the GPT on 2 cores of an AVX2-only CPU in fp32 (1880 steps of
configs/gpt.yaml; on an AVX512-BF16 CPU in bf16 it takes about half that). A FLOP budget means
the same on every machine; the same runs are also plotted against training time, which does
not. compare writes compare/<name>/results.{md,json,png}; this script copies them
to benchmarks/results/budget.{md,json,png}.

    python -m benchmarks.budget [--budget 1.5e13flop] [--seeds 3] [--archs gpt rnn backpack cnn]

With --grid (e.g. `--budget 3e12flop --seeds 2 --grid model.net.n_layer=2,4,8 --out sizes`) it runs
every architecture at every grid point, and compare adds an iso-budget curve per architecture (loss
against parameters at one budget, results_scaling.png); the outputs go to benchmarks/results/OUT.*.

Run it on an otherwise idle machine: about an hour on 2 CPU cores (12 runs). Running it again resumes an
interrupted comparison (finished runs are kept), then redraws.
"""

import argparse

from benchmarks.common import corpus_path, run_compare


def compare_command(archs: list[str], budget: str, seeds: int, grids: tuple[str, ...] = (), out: str = "budget"
                    ) -> list[str]:
    """The `gptnano compare` arguments of the headline comparison (run from the repository root)."""
    return [*(f"configs/{arch}.yaml" for arch in archs), "--budget", budget, "--seeds", str(seeds),
            "--name", f"{out}-{budget}", "--data.path", corpus_path(), *(a for g in grids for a in ("--grid", g))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="1.5e13flop", help="what every run gets (default: 1.5e13flop)")
    ap.add_argument("--seeds", type=int, default=3, help="runs per architecture (default: 3)")
    ap.add_argument("--archs", nargs="+", default=["gpt", "rnn", "backpack", "cnn"])
    ap.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,...: compare's --grid, for every arch")
    ap.add_argument("--out", default="budget", help="name of the comparison and of its results (default: budget)")
    args = ap.parse_args()
    run_compare(["compare", *compare_command(args.archs, args.budget, args.seeds, tuple(args.grid), args.out)],
                f"{args.out}-{args.budget}", args.out)


if __name__ == "__main__":
    main()
