"""What the command line alone says before it is parsed, as pure functions: no Lightning,
tested on plain dicts.

Every checkpoint keeps the config its run was parsed into (``gptnano.checkpoint.run_config``).
A command that starts from a checkpoint (``fit --ckpt_path``, ``validate``, ``test``,
``predict``) parses on top of it: the checkpoint's config is the parser's base, given as the
first config file (``with_base``), and the command line applies over it in jsonargparse's own
left-to-right order. Which checkpoint that is comes from a few flags read here first
(``read_command_line``, ``named_file``). What the result may not change is one table in
gptnano/checkpoint.py (``REFUSED``, ``refusals``); the Trainer settings refused before anything
is built are in gptnano/train/trainer_args.py. Also here: short architecture names and the
moved class paths of older config files.
"""

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from gptnano.errors import UserError
from gptnano.models import MODELS

# Classes that config files of older runs name by a path that has since moved. A saved
# config.yaml naming one still works.
MOVED = {
    "gptnano.board.Board": "gptnano.train.logger.Board",
    "gptnano.board.RunSettings": "gptnano.train.logger.RunSettings",
    "gptnano.callbacks.Checkpoint": "gptnano.train.checkpointing.Checkpoint",
    "gptnano.callbacks.AtomicCheckpointIO": "gptnano.train.checkpointing.AtomicCheckpointIO",
    "gptnano.callbacks.Throughput": "gptnano.train.callbacks.Throughput",
    "gptnano.callbacks.TextSample": "gptnano.train.callbacks.TextSample",
    "gptnano.callbacks.PredictionWriter": "gptnano.train.callbacks.PredictionWriter",
    "gptnano.lit.LitLM": "gptnano.train.module.LitLM",
    "gptnano.data.ShakespeareDataModule": "gptnano.data.datamodule.ShakespeareDataModule",
}
class CommandLine(NamedTuple):
    """What the command line alone says, before any config file is read."""

    subcommand: str | None
    ckpt_path: str | None
    run_name: str | None
    dirpath: str | None  # --checkpoint.dirpath
    root: str | None  # --trainer.default_root_dir
    configs: list[str]
    typed: set[str]  # dotted keys typed, jsonargparse's optional "init_args" level dropped
    init_from: str | None  # fit --init_from: a trained model a new run starts from


def read_command_line(argv: list[str], subcommands) -> CommandLine:
    """The few options that decide which checkpoint to read, from ``argv``, with argparse."""
    scan = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--ckpt_path", "--run_name", "--checkpoint.dirpath", "--trainer.default_root_dir", "--init_from"):
        scan.add_argument(flag)
    scan.add_argument("--config", "-c", action="append", default=[])
    known, _ = scan.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    subcommand = next((a for a in argv if a in subcommands), None)
    typed = {a[2:].split("=", 1)[0].replace(".init_args.", ".") for a in argv if a.startswith("--") and a != "--"}
    return CommandLine(subcommand, known.ckpt_path, known.run_name, getattr(known, "checkpoint.dirpath"),
                       getattr(known, "trainer.default_root_dir"), known.config, typed, known.init_from)


def run_folder(run_name: str | None, dirpath: str | None, root: str | None = None) -> Path | None:
    """A run's checkpoint folder: --checkpoint.dirpath, else <default_root_dir>/checkpoints/<run_name>."""
    if dirpath:
        return Path(dirpath)
    return Path(root or ".") / "checkpoints" / run_name if run_name else None


def named_file(ckpt_path: str, folder: Path | None, subcommand: str | None) -> str:
    """The file ``--ckpt_path last`` or ``best`` names in a run's folder, or the one-line error."""
    if folder is None:
        raise UserError(f"--ckpt_path {ckpt_path} needs --run_name NAME (or --config FILE) to find "
                        f"checkpoints/NAME/{ckpt_path}.ckpt; or pass the checkpoint file itself")
    path = folder / f"{ckpt_path}.ckpt"
    if not path.is_file():
        action = "resume" if subcommand == "fit" else subcommand or "start"
        raise UserError(f"--ckpt_path {ckpt_path}: no {path} to {action} from (train first, or pass a checkpoint file)")
    return str(path)


def with_base(argv: list[str], subcommand: str | None, base: dict) -> list[str]:
    """``argv`` with ``base`` (a config as a nested dict) given as the first config file of the
    subcommand, so that everything typed after it applies over it, left to right."""
    at = argv.index(subcommand) + 1 if subcommand in argv else 0
    return [*argv[:at], "--config=" + yaml.safe_dump(base, sort_keys=False), *argv[at:]]


def architecture_names(argv: list[str]) -> list[str]:
    """Let ``--model.net rnn`` mean the registered class; refuse unknown short names clearly."""
    argv = list(argv)
    for i, a in enumerate(argv[:-1]):
        name = argv[i + 1]
        if a == "--model.net" and name.isidentifier():
            cls = MODELS.get(name.lower())
            if cls is None:
                known = ", ".join(c.__name__ for c in MODELS.values())
                raise UserError(f"unknown architecture {name!r}: choose one of {known} (or give a class path)")
            argv[i + 1] = cls.__name__
    return argv


def moved_class_paths(argv: list[str]) -> list[str]:
    """``--config FILE`` of a file that names a moved class: its text with today's paths
    (jsonargparse takes a config's text where it takes its path); one line says so."""
    argv = list(argv)
    for i, a in enumerate(argv):
        flag = a in ("--config", "-c")
        path = argv[i + 1] if flag and i + 1 < len(argv) else (a.split("=", 1)[1] if a.startswith("--config=") else None)
        if path is None or "\n" in path or not Path(path).is_file():
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # the parser says what is wrong with it
        old = [name for name in MOVED if re.search(rf"\b{re.escape(name)}\b", text)]
        if not old:
            continue
        for name in old:
            text = re.sub(rf"\b{re.escape(name)}\b", MOVED[name], text)
        print(f"gptnano: {path} names {', '.join(old)}, since moved: read as "
              f"{', '.join(MOVED[n] for n in old)}", file=sys.stderr)
        argv[i + 1 if flag else i] = text if flag else f"--config={text}"
    return argv
