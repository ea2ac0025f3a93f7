"""The `gptnano` command: a light dispatcher in front of every subcommand.

Lightning's four commands (fit, validate, test, predict) go to LightningCLI
(gptnano/cli/lightning.py); the table of commands is gptnano/cli/commands.py. The tools (generate, senses, plot) read a checkpoint or
TensorBoard logs and train nothing, so they run without importing Lightning,
which costs seconds of start-up; so does ``gptnano --help``. This module
imports only the standard library and gptnano's own Lightning-free, torch-free modules: keep it that way.
"""

import os
import sys
from importlib import import_module

from gptnano.cli.commands import LIGHTNING, TOOLS
from gptnano.errors import UserError
from gptnano.files import keep_compile_cache

VERBOSE_ENV = "GPTNANO_VERBOSE"


def usage() -> str:
    """The top-level help: every subcommand and tool, without asking Lightning for it."""
    width = max(map(len, [*LIGHTNING, *TOOLS]))
    lines = ["usage: gptnano [--verbose] COMMAND [options]", "",
             "Train and sample small language models written from scratch.", "",
             "Training and evaluation, through PyTorch Lightning (gptnano COMMAND --help lists every option):"]
    lines += [f"  {name:<{width}}  {what}" for name, what in LIGHTNING.items()]
    lines += ["", "Tools (they start without Lightning; gptnano TOOL --help):"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in TOOLS.items()]
    lines += ["", "options:",
              "  -h, --help  show this help and exit",
              f"  --verbose   show every message and warning Lightning prints (or set {VERBOSE_ENV}=1)",
              "",
              "Example: gptnano fit --config configs/gpt.yaml, then",
              "         gptnano generate --ckpt_path checkpoints/gpt/best.ckpt --interactive"]
    return "\n".join(lines)


def wants_verbose(argv: list[str]) -> tuple[bool, list[str]]:
    """``--verbose`` anywhere on the line, or GPTNANO_VERBOSE set to anything but 0; returns
    (verbose, the arguments without it), since Lightning's parser does not know the flag."""
    flag = "--verbose" in argv
    env = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    return flag or env, [a for a in argv if a != "--verbose"]


def dispatch(argv: list[str]) -> None:
    verbose, argv = wants_verbose(argv)
    command = argv[0] if argv else None
    if command not in (None, "-h", "--help"):
        keep_compile_cache()  # before anything imports Lightning, which fixes torch.compile's cache folder
    if command in TOOLS:
        import_module(TOOLS[command][0]).main(argv[1:])
    elif command in ("-h", "--help"):
        print(usage())
    elif command is None:
        print(usage(), file=sys.stderr)
        raise UserError("choose a command")
    elif command.startswith("-") or command in LIGHTNING:  # `gptnano -c cfg.yaml fit` is Lightning's too
        from gptnano.cli.lightning import run

        run(argv, verbose=verbose)
    else:
        raise UserError(f"unknown command {command!r}: choose one of {', '.join([*LIGHTNING, *TOOLS])}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``gptnano`` console script and ``python -m gptnano``:
    mistakes a user can fix are one line and exit status 2, Ctrl-C is status 130."""
    try:
        dispatch(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"gptnano: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
