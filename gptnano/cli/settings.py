"""Where a run's settings come from, as pure functions: no Lightning, tested on plain dicts.

The rule: **a checkpoint supplies the settings, typed flags win.** When ``--ckpt_path``
names a checkpoint, the run's settings are the checkpoint's, whatever a ``--config`` file
says, except those typed on the command line. Among the typed ones, the network's sizes
are taken only if the saved weights still fit them (dropout, say; not another n_layer),
and the vocabulary and the tokenizer are always the checkpoint's: the weights were
trained for them. The Lightning CLI (gptnano/cli/lightning.py) asks these functions and
applies their answers.

Also here: what the command line alone says before jsonargparse parses it (the checkpoint
must be read first: its network becomes the parser's default, so ``predict --ckpt_path X``
needs no ``--model.net``), and the rewriting of short architecture names and of class
paths that have moved since a config.yaml was saved.
"""

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from gptnano.errors import UserError
from gptnano.models import MODELS

# Classes that config files of older runs name by a path that has since moved (the
# package was regrouped into layers). A saved config.yaml naming one still works.
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
# What a checkpoint fixes on the data side: the tokenizer, i.e. its vocabulary and kind.
DATA_FROM_CHECKPOINT = ("vocab", "tokenizer")


class CommandLine(NamedTuple):
    """What the command line alone says, before any config file is read."""

    subcommand: str | None
    ckpt_path: str | None
    run_name: str | None
    dirpath: str | None  # --checkpoint.dirpath
    configs: list[str]
    typed: set[str]  # dotted keys typed, jsonargparse's optional "init_args" level dropped
    init_from: str | None  # fit --init_from: a trained model a new run starts from


def read_command_line(argv: list[str], subcommands) -> CommandLine:
    """The few options that decide which checkpoint to read, from ``argv``, with argparse."""
    scan = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--ckpt_path", "--run_name", "--checkpoint.dirpath", "--init_from"):
        scan.add_argument(flag)
    scan.add_argument("--config", "-c", action="append", default=[])
    known, _ = scan.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    subcommand = next((a for a in argv if a in subcommands), None)
    typed = {a[2:].split("=", 1)[0].replace(".init_args.", ".") for a in argv if a.startswith("--") and a != "--"}
    return CommandLine(subcommand, known.ckpt_path, known.run_name, getattr(known, "checkpoint.dirpath"),
                       known.config, typed, known.init_from)


def run_folder(run_name: str | None, dirpath: str | None) -> Path | None:
    """A run's checkpoint folder: --checkpoint.dirpath, else checkpoints/<run_name>."""
    if dirpath:
        return Path(dirpath)
    return Path("checkpoints") / run_name if run_name else None


def checkpoint_named(cmd: CommandLine) -> str | None:
    """The checkpoint file ``--ckpt_path`` names, where the command line alone tells it
    (``last`` and ``best`` need the run's folder: --run_name or --checkpoint.dirpath)."""
    if cmd.ckpt_path not in ("last", "best"):
        return cmd.ckpt_path
    folder = run_folder(cmd.run_name, cmd.dirpath)
    path = folder / f"{cmd.ckpt_path}.ckpt" if folder else None
    return str(path) if path is not None and path.is_file() else None


def parser_defaults(hparams: dict, model_args: set[str]) -> dict:
    """The parser's defaults from a checkpoint's hyper-parameters (``model.*`` and the
    tokenizer's ``data.*``), so the network a checkpoint names needs no --model.net."""
    defaults = {f"model.{k}": v for k, v in hparams.items() if k in model_args}
    defaults.update({f"data.{k}": v for k, v in data_from(hparams).items()})
    return defaults


def data_from(hparams: dict) -> dict:
    """The data module's settings a checkpoint fixes: the tokenizer (its vocabulary and kind)."""
    saved = {"vocab": hparams.get("vocab") or None, "tokenizer": hparams.get("tokenizer", "char")}
    return {k: v for k, v in saved.items() if v is not None}


def from_checkpoint(hparams: dict, net_class: str, net_args: dict, model: dict, typed: set[str], *,
                    weights_fit: Callable[[dict], bool], source: str) -> dict:
    """The settings to set, as ``{dotted key: value}``, when the run's checkpoint supplies them.

    Args:
        hparams: The checkpoint's hyper-parameters (LitLM's arguments, ``net`` as
            ``{"class_path", "init_args"}``, ``vocab``, ``tokenizer``).
        net_class: The class name of the network the config asks for (e.g. "GPT").
        net_args: The checkpoint's checked network arguments (``checkpoint.architecture``).
        model: The parsed ``model`` settings (``net.init_args`` among them).
        typed: Dotted keys typed on the command line.
        weights_fit: Whether the saved weights fit the network with the given arguments.
        source: The checkpoint's path, for messages.

    Raises:
        UserError: the config asks for another architecture, or typed network sizes that
            the saved weights cannot take.
    """
    saved_class = hparams["net"]["class_path"].rsplit(".", 1)[-1]
    if saved_class != net_class:
        raise UserError(f"{source} holds a {saved_class} network, but --config or --model.net ask for {net_class}: "
                        f"give the {saved_class}'s config, or none")
    asked = (model.get("net") or {}).get("init_args") or {}
    changed = {k: asked.get(k) for k in net_args if f"model.net.{k}" in typed and asked.get(k) != net_args[k]}
    if changed and not weights_fit({**net_args, **changed}):
        shown = ", ".join(f"{k}={v} (saved: {net_args[k]})" for k, v in changed.items())
        raise UserError(f"{source} cannot take {shown}: its saved weights have other shapes "
                        "(start a new run with --run_name to change the network)")
    settings = {f"model.net.init_args.{k}": v for k, v in {**net_args, **changed}.items()}
    settings.update({f"model.{k}": v for k, v in hparams.items()
                     if k in model and k != "net" and f"model.{k}" not in typed})
    settings.update({f"data.{k}": v for k, v in data_from(hparams).items()})
    return settings


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
        if path is None or not Path(path).is_file():
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
