"""`gptnano compare`: train configs (and grid points) for the same budget over several seeds,
each run a real `gptnano fit` in its own process, and rank them only as far as the seeds allow.

    gptnano compare configs/gpt.yaml configs/rnn.yaml configs/backpack.yaml configs/cnn.yaml --budget 5min --seeds 3

Everything goes to compare/<name>/: the runs' checkpoints/ and lightning_logs/, one record
per run in runs/ (its configuration's hash, schedule and result), each fit's output in
logs/, and results.md, results.json, results.png. A run that fails (an error, a diverged
loss) is a result: the others go on, and it is listed below the ranking. Running the same
command again skips finished and failed runs, resumes an interrupted one from its last.ckpt,
then redraws the results. One process at a time runs a comparison.
Exit status: 0 when every run finished, 1 when results were written with failed runs, 2 when
the comparison was refused; stopped by a signal, as a shell reports it (130 after Ctrl-C).
docs/compare.md explains budgets, seeds, the statistics and the outputs.
"""

import argparse

from gptnano import lines
from gptnano.compare import budgets
from gptnano.compare.comparison import Comparison
from gptnano.compare.runs import OWNED, is_option
from gptnano.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message)


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="gptnano compare", formatter_class=argparse.RawDescriptionHelpFormatter,
                usage="gptnano compare CONFIG... --budget B [--seeds N] [--name NAME] [--grid KEY=V1,V2,...] "
                      "[--validations N] [--parallel K] [--retry_failed] [--dry_run] [fit flags for every run]",
                description="\n\n".join(__doc__.split("\n\n")[:3]),
                epilog="Any other flag is a `gptnano fit` flag given to every run (e.g. --data.path FILE, "
                       "--model.net.dropout 0.1); it takes a value. These are set by compare and refused: "
                       + ", ".join(f"--{k}" for k in OWNED) + ".")
    ap.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs of `gptnano fit` to compare")
    ap.add_argument("--budget", required=True, help="what every run gets: " + budgets.EXAMPLES + ". Steps, warmup "
                    "and learning-rate decay are fitted to it; only wall time depends on the machine (each run of a "
                    "wall-time budget plans its steps again from its own pace while it trains)")
    ap.add_argument("--seeds", type=int, default=3, help="runs per entry, seeds 0..N-1; a seed sets seed_everything "
                    "and data.seed (initialisation, dropout, order of training windows) (default: 3)")
    ap.add_argument("--name", help="folder under compare/ (default: the configs' names and the budget)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="train every config at each value of a fit flag, e.g. model.muon_lr=0.01,0.02,0.04; "
                         "several --grid form their product")
    ap.add_argument("--validations", type=int, default=10, help="validation passes per run, evenly spaced, the "
                    "last at the final step (between half and twice this many, to fit the steps) (default: 10)")
    ap.add_argument("--parallel", type=int, default=1, metavar="K", help="run K at a time, one per GPU (GPUs only: "
                    "on a CPU parallel runs would distort every speed and time budget) (default: 1)")
    ap.add_argument("--retry_failed", action="store_true", help="train the runs recorded as failed again, from "
                    "their last checkpoint (a rerun keeps failures as results otherwise)")
    ap.add_argument("--dry_run", action="store_true", help="check everything and print each entry's schedule; "
                    "train nothing")
    return ap


# ----- the command line -------------------------------------------------------------------
OWN_WITH_VALUE = ("--budget", "--seeds", "--name", "--grid", "--validations", "--parallel")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(compare's own arguments and the configs, the fit flags for every run). A fit flag
    takes one value (``--model.net.dropout 0.1`` or ``--model.net.dropout=0.1``)."""
    own, fit = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in OWN_WITH_VALUE:
            own += argv[i:i + (1 if "=" in token else 2)]
            i += 1 if "=" in token else 2
        elif token in ("--dry_run", "--retry_failed", "-h", "--help") or not is_option(token):
            own.append(token)
            i += 1
        else:
            takes_next = "=" not in token and i + 1 < len(argv) and not is_option(argv[i + 1])
            fit += argv[i:i + 1 + takes_next]
            i += 1 + takes_next
    return own, fit


def main(argv: list[str]) -> None:
    own, fit_flags = split_argv(argv)
    args = parser().parse_args(own)
    comparison = Comparison(args, fit_flags, argv)
    if not args.dry_run:
        comparison.check_not_running()
    comparison.prepare()
    if args.dry_run:
        comparison.dry_run()
        return
    with comparison.sole_runner():
        comparison.write_command()
        comparison.execute()
        written = comparison.report()
    lines.say(f"compare {comparison.name}", "wrote " + ", ".join(str(p) for p in written))
    if failed := comparison.failures:
        lines.say(f"compare {comparison.name}", f"{len(failed)} of {len(comparison.runs)} runs failed (listed in "
                  "results.md, not ranked); the same command keeps them, --retry_failed trains them again")
        raise SystemExit(1)
