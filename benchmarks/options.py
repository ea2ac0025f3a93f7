"""Which GPT options, schedules and Muon settings pay for themselves (issue 28): `gptnano compare`
sweeps at the quick start's wall-time budget, 3 seeds each, so an option that costs throughput
pays for it in fewer steps. Each sweep is one comparison; its results are copied to
benchmarks/results/options-<sweep>.{md,json,png}, and docs/results.md ("Options at equal wall
time") reads them. A default changes only where an entry beats the baseline by more than two
standard errors of the difference.

    python -m benchmarks.options [--sweeps attention schedule ...] [--budget 60s] [--seeds 3]

Run it on an otherwise idle machine (a wall-time budget is this machine's, at this moment): about
15 minutes a sweep on 2 CPU cores. Running it again resumes an interrupted sweep.
"""

import argparse

from benchmarks.common import corpus_path, run_compare

# sweep -> (configs, grids, budget): every config at every grid point (the grids' product). Options that
# change a step's cost get a wall-time budget; those that cost nothing per step (a schedule, a momentum
# ramp) get the steps the quick start's ~60 s hold, which is the same wall time without the noise of
# planning it on a shared machine (whose pace drifts by 15 % within minutes).
SWEEPS = {
    # The attention options, alone and together (configs/gpt.yaml's learned positions is the first point).
    "attention": (["configs/gpt.yaml"], ["model.net.rope=false,true", "model.net.qk_norm=false,true"], "60s"),
    # RoPE again, from scratch in compare's seed-by-seed order (the attention sweep's default entry got less time
    # than its budget), against the warmup that decides how soon the quick start passes 1.88.
    "rope-warmup": (["configs/gpt.yaml"], ["model.net.rope=false,true", "model.warmup_steps=100,20"], "60s"),
    # The two learning rates of the quick start as it is now (RoPE, warmup 20, 800 steps): losses are deterministic
    # for a seed, so equal steps are equal wall time; what a higher rate buys is the early curve (time to 1.88).
    "rates": (["configs/gpt.yaml"], ["model.muon_lr=0.02,0.035", "model.learning_rate=4e-3,8e-3"], "800steps"),
    # The other two GPT options, on the config as shipped (learned positions, no QK-norm).
    "gpt-extras": (["configs/gpt.yaml"], ["model.net.embed_shortcut=false,true", "model.net.logit_softcap=null,30"],
                   "60s"),
    # The schedule and Muon's momentum warmup (not GPT-specific), on the GPT first ...
    "schedule": (["configs/gpt.yaml"], ["model.lr_schedule=cosine,wsd", "model.muon_momentum_warmup_steps=0,300"],
                 "600steps"),
    # ... then on the other three architectures: the trapezoid against the cosine.
    "schedule-others": (["configs/rnn.yaml", "configs/backpack.yaml", "configs/cnn.yaml"],
                        ["model.lr_schedule=cosine,wsd"], "600steps"),
    # The GPT's 20-step warmup (a schedule lever, not GPT-specific) on the other three, against their 100.
    "warmup-others": (["configs/rnn.yaml", "configs/backpack.yaml", "configs/cnn.yaml"],
                      ["model.warmup_steps=100,20"], "600steps"),
    # The batch: at these sizes a 2-core CPU's step costs little more at batch 48 than at 24 (single runs: ~1.45x),
    # so a wider batch may buy more in the quick start's ~70 s of training than it costs in steps.
    "batch": (["configs/gpt.yaml"], ["data.batch_size=24,48,64"], "70s"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    ap.add_argument("--budget", help="what every run gets (default: each sweep's own, 60s or 600steps)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="fit flags for every run of every sweep")
    args = ap.parse_args()
    for sweep in args.sweeps:
        configs, grids, budget = SWEEPS[sweep]
        name = f"options-{sweep}"
        run_compare(["compare", *configs, "--budget", args.budget or budget, "--seeds", str(args.seeds), "--name",
                     name, "--data.path", corpus_path(), *(a for g in grids for a in ("--grid", g)), *args.extra],
                    name, name)


if __name__ == "__main__":
    main()
