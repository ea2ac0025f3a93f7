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
import ast
import datetime
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

# Settings a resume (`fit --ckpt_path`) refuses to change, with the reason: their saved
# value is part of what the run keeps. Every other setting typed on a resume is applied from
# the next step on (LitLM re-applies the optimizer's settings and the schedule after Lightning
# restored the saved ones; gptnano's EarlyStopping keeps the patience it was built with).
# docs/reliability.md has the whole table.
REFUSED_ON_RESUME = {
    "model.optimizer": "the saved optimizer state is the other optimizer's",
    "checkpoint.monitor": "best.ckpt and its score are kept by this metric",
    "checkpoint.mode": "best.ckpt and its score are kept by this order",
    "checkpoint.every_n_train_steps": "Lightning keys the saved best-model state by it",
    "early_stopping.monitor": "the saved best score and wait count are of this metric",
    "early_stopping.mode": "the saved best score and wait count are kept by this order",
    "data.val_fraction": "best.ckpt's score and early stopping compare losses on this validation split",
    "data.test_fraction": "it moves the validation split that best.ckpt's score was measured on",
    "data.val_tokens": "best.ckpt's score and early stopping compare losses on these validation windows",
}
# Compared with a typed value only, never set from the checkpoint: Lightning derives other
# settings from whether it was given at all (every_n_epochs), which would change the state key.
COMPARED_ONLY = {"checkpoint.every_n_train_steps"}
# Refused by every command that reads a checkpoint: the weights were trained for them.
ALWAYS_THE_CHECKPOINT_S = {
    "data.vocab": "the weights were trained for the checkpoint's vocabulary",
    "data.tokenizer": "the weights were trained for the checkpoint's tokenizer",
}


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


def _state_key_fields(key: str) -> tuple[str, dict]:
    """``"Checkpoint{'monitor': 'val/loss', ...}"`` (a callback's state key) -> ("Checkpoint", {...})."""
    name, _, fields = key.partition("{")
    try:
        parsed = ast.literal_eval("{" + fields) if fields else {}
    except (ValueError, SyntaxError):
        parsed = {}
    return name, parsed if isinstance(parsed, dict) else {}


def saved_settings(ckpt: dict) -> dict:
    """What a checkpoint knows of its run beyond the model's hyper-parameters, as
    ``{dotted key: value}``: the run's name and seed (``ckpt["gptnano"]``), the data module's
    settings (its saved state), and the settings that key the saved state of the checkpoint
    and early-stopping callbacks (monitor, mode; early stopping's patience)."""
    found = {}
    meta = ckpt.get("gptnano") or {}
    if meta.get("run_name"):
        found["run_name"] = meta["run_name"]
    if isinstance(meta.get("seed"), int):
        found["seed_everything"] = meta["seed"]
    for key, value in (ckpt.get("ShakespeareDataModule") or {}).items():
        found[f"data.{key}"] = value
    hparams = ckpt.get("hyper_parameters") or {}
    if "optimizer" in hparams:
        found["model.optimizer"] = hparams["optimizer"]
    for key, state in (ckpt.get("callbacks") or {}).items():
        name, fields = _state_key_fields(str(key))
        group = {"Checkpoint": "checkpoint", "EarlyStopping": "early_stopping"}.get(name)
        if group is None:
            continue
        for field in ("monitor", "mode") + (("every_n_train_steps",) if group == "checkpoint" else ()):
            if field in fields:
                found[f"{group}.{field}"] = fields[field]
        if group == "early_stopping" and isinstance(state, dict) and "patience" in state:
            found["early_stopping.patience"] = state["patience"]
    return found


def _same(key: str, a, b) -> bool:
    if key == "checkpoint.every_n_train_steps":  # None and 0 both mean "off"
        return (a or 0) == (b or 0)
    return a == b


def on_resume(saved: dict, asked: dict, typed: set[str], *, fitting: bool, source: str) -> dict:
    """The rule for the settings ``saved_settings`` found: the checkpoint's value where nothing
    was typed; a typed value otherwise, unless a resume (``fitting``) refuses to change it.

    Args:
        saved: ``saved_settings(ckpt)``.
        asked: The parsed value of each of those keys (from config files, defaults, typed flags).
        typed: Dotted keys typed on the command line.
        fitting: Whether the command is ``fit`` (a resume): only then are REFUSED_ON_RESUME refused.
        source: The checkpoint's path, for messages.

    Returns:
        ``{dotted key: value}`` to set: the saved values of the settings not typed.

    Raises:
        UserError: a typed value that the run cannot take, naming the setting, both values and why.
    """
    refused = {**ALWAYS_THE_CHECKPOINT_S, **(REFUSED_ON_RESUME if fitting else {})}
    chosen = {}
    for key, value in saved.items():
        if key not in typed:
            if key not in COMPARED_ONLY:
                chosen[key] = value
        elif key in refused and not _same(key, asked.get(key), value):
            raise UserError(f"--{key} {asked.get(key)} cannot change on resume (the run's is {value}): "
                            f"{refused[key]}; start a new run with --run_name to change it")
    return chosen


def check_trainer(trainer: dict) -> None:
    """Refuse Trainer settings that cannot work, before anything is built (one line each).

    Only the settings gptnano's docs mention or that count steps: ``max_steps``, ``val_check_interval``,
    ``log_every_n_steps``, ``accumulate_grad_batches``, ``gradient_clip_val``, ``max_time``,
    ``num_nodes`` and ``limit_val_batches``.

    Raises:
        UserError: naming the setting, its value and what it must be.
    """
    def bad(key: str, what: str) -> UserError:
        return UserError(f"--trainer.{key} must be {what}, got {trainer.get(key)!r}")

    max_steps = trainer.get("max_steps")
    if max_steps is None or max_steps <= 0:
        raise UserError(f"--trainer.max_steps must be a positive number of optimizer steps, got {max_steps} "
                        "(the learning rate decays over them)")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (isinstance(interval, int) and interval >= 1
                                     or isinstance(interval, float) and 0 < interval <= 1):
        raise bad("val_check_interval", "a positive number of steps between validations")
    for key in ("log_every_n_steps", "accumulate_grad_batches", "num_nodes"):
        if trainer.get(key) is not None and not (isinstance(trainer[key], int) and trainer[key] >= 1):
            raise bad(key, "a whole number >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not clip >= 0:
        raise bad("gradient_clip_val", ">= 0 (0 turns clipping off)")
    limit = trainer.get("limit_val_batches")
    if limit is not None and not limit >= 0:
        raise bad("limit_val_batches", ">= 0")
    max_time = trainer.get("max_time")
    if max_time is not None and not _positive_time(max_time):
        raise bad("max_time", "a positive duration such as 00:01:30:00 (DD:HH:MM:SS)")


def check_callbacks(checkpoint: dict, early_stopping: dict) -> None:
    """Refuse checkpoint and early-stopping settings that cannot work (one line each).

    Raises:
        UserError: naming the setting, its value and what it must be.
    """
    rules = [("early_stopping.patience", early_stopping.get("patience"), lambda v: isinstance(v, int) and v >= 0,
              "a whole number of validations >= 0"),
             ("early_stopping.min_delta", early_stopping.get("min_delta"), lambda v: v >= 0, ">= 0"),
             ("checkpoint.save_top_k", checkpoint.get("save_top_k"), lambda v: isinstance(v, int) and v >= -1,
              "-1 (all), 0 (none) or a positive number of checkpoints"),
             ("checkpoint.last_every_n_steps", checkpoint.get("last_every_n_steps"), lambda v: v >= 0,
              "a number of steps >= 0 (0: off)")]
    for key, value, ok, what in rules:
        if value is not None and not ok(value):
            raise UserError(f"--{key} must be {what}, got {value!r}")


def _positive_time(value) -> bool:
    if isinstance(value, dict):
        try:
            return datetime.timedelta(**value).total_seconds() > 0
        except TypeError:
            return False
    if isinstance(value, datetime.timedelta):
        return value.total_seconds() > 0
    parts = str(value).split(":")
    try:
        return len(parts) == 4 and all(int(p) >= 0 for p in parts) and any(int(p) > 0 for p in parts)
    except ValueError:
        return False


def missing_checkpoint(cmd: CommandLine) -> str | None:
    """Why ``--ckpt_path last`` / ``best`` names no file when only the command line is known, or
    None: the error to give instead of the parser's ``the following arguments are required:
    model.net`` (a checkpoint found would have supplied the network)."""
    if cmd.ckpt_path not in ("last", "best") or checkpoint_named(cmd) or cmd.configs or "model.net" in cmd.typed:
        return None
    folder = run_folder(cmd.run_name, cmd.dirpath)
    action = "resume" if cmd.subcommand == "fit" else cmd.subcommand or "start"
    if folder is None:
        return (f"--ckpt_path {cmd.ckpt_path} needs --run_name NAME (or --config FILE) to find "
                f"checkpoints/NAME/{cmd.ckpt_path}.ckpt; or pass the checkpoint file itself")
    return f"--ckpt_path {cmd.ckpt_path}: no {folder / (cmd.ckpt_path + '.ckpt')} to {action} from " \
           "(train first, or pass a checkpoint file)"


def holds_a_run(folder: Path) -> bool:
    """Whether a run folder already holds checkpoints (a fresh run there would overwrite them)."""
    return folder.is_dir() and any(folder.glob("*.ckpt"))


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
