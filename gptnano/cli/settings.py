"""Where a run's settings come from, as pure functions: no Lightning, tested on plain dicts.

Every checkpoint keeps the config its run was parsed into (``gptnano.checkpoint.run_config``).
A command that starts from a checkpoint (``fit --ckpt_path``, ``validate``, ``test``,
``predict``) parses on top of it: the checkpoint's config is the parser's base, and the command
line applies over it in jsonargparse's own left-to-right order (``with_base``), except the keys
that are never taken from a checkpoint (``NEVER_FROM_CHECKPOINT``). What the result may not
change is one table, ``REFUSED``, read by one function, ``refusals``. Also here: what the
command line alone says before it is parsed, short architecture names and moved class paths,
and the Trainer settings refused before anything is built (``check_trainer``).
"""

import argparse
import datetime
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
# The command's own settings, and the machine's: a checkpoint never supplies them. (The
# precision of a run resumed on the same kind of device is kept by the facts, docs/reliability.md.)
NEVER_FROM_CHECKPOINT = ("ckpt_path", "init_from", "trainer.fast_dev_run", "trainer.accelerator", "trainer.devices",
                         "trainer.strategy", "trainer.num_nodes", "trainer.precision")
WEIGHTS = "the weights were trained for the checkpoint's"
# What a command starting from a checkpoint may not change: key -> (the commands refusing it, why).
# Every other setting applies as parsed. The network's sizes are refused the same way (``refusals``).
REFUSED = {
    "data.vocab": ("every", f"{WEIGHTS} vocabulary"),
    "data.tokenizer": ("every", f"{WEIGHTS} tokenizer"),
    "model.optimizer": ("fit", "the saved optimizer state is the other optimizer's"),
    "checkpoint.monitor": ("fit", "best.ckpt and its score are kept by this metric"),
    "checkpoint.mode": ("fit", "best.ckpt and its score are kept by this order"),
    "checkpoint.every_n_train_steps": ("fit", "Lightning keys the saved best-model state by it"),
    "early_stopping.monitor": ("fit", "the saved best score and wait count are of this metric"),
    "early_stopping.mode": ("fit", "the saved best score and wait count are kept by this order"),
    "data.val_fraction": ("fit", "best.ckpt's score and early stopping compare losses on this validation split"),
    "data.test_fraction": ("fit", "it moves the validation split that best.ckpt's score was measured on"),
    "data.val_tokens": ("fit", "best.ckpt's score and early stopping compare losses on these validation windows"),
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


def without(config: dict, keys=NEVER_FROM_CHECKPOINT) -> dict:
    """A nested config less the dotted ``keys``."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in keys:
        head, _, tail = key.partition(".")
        if tail and isinstance(config.get(head), dict):
            config[head].pop(tail, None)
        elif not tail:
            config.pop(head, None)
    return config


def flat(config: dict, prefix: str = "") -> dict:
    """``{"model": {"net": {"init_args": {"n_layer": 4}}}}`` -> ``{"model.net.n_layer": 4}``."""
    out = {}
    for key, value in config.items():
        if key == "init_args":
            out.update(flat(value or {}, prefix))
        elif isinstance(value, dict) and key not in ("callbacks", "logger", "plugins"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def refusals(saved: dict, asked: dict, *, fitting: bool, fixed: set[str], source: str) -> None:
    """Refuse, in one line, the first setting a command starting from a checkpoint may not change.

    Args:
        saved: The checkpoint's config (``run_config``), the vocabulary and tokenizer in ``data``.
        asked: The config this command parsed, on top of ``saved``.
        fitting: Whether the command is ``fit`` (a resume): only then are the "fit" rows refused.
        fixed: The network's arguments its weights fix (not its ``run_settings``).
        source: The checkpoint's path, for messages.

    Raises:
        UserError: naming the setting, both values and why.
    """
    old, new = flat(saved), flat(asked)
    old_net, new_net = (str(c.get("model.net.class_path", "")).rsplit(".", 1)[-1] for c in (old, new))
    if new_net and old_net and new_net != old_net:
        raise UserError(f"{source} holds a {old_net} network, but --config or --model.net ask for {new_net}: "
                        f"give the {old_net}'s config, or none")
    sizes = {k: (old[f"model.net.{k}"], new.get(f"model.net.{k}")) for k in sorted(fixed) if f"model.net.{k}" in old}
    if changed := {k: (a, b) for k, (a, b) in sizes.items() if a != b}:
        shown = ", ".join(f"{k}={b} (saved: {a})" for k, (a, b) in changed.items())
        raise UserError(f"{source} cannot take {shown}: its saved weights have other shapes "
                        "(start a new run with --run_name to change the network)")
    for key, (who, why) in REFUSED.items():
        before, after = old.get(key), new.get(key)
        if key == "checkpoint.every_n_train_steps":  # None and 0 both mean "off"
            before, after = before or 0, after or 0
        if key in old and before != after and (fitting or who == "every"):
            raise UserError(f"--{key} {after} cannot change on {'resume' if fitting else 'a checkpoint'} (the run's "
                            f"is {before}): {why}; start a new run with --run_name to change it")


def check_trainer(trainer: dict, typed: set[str] = frozenset()) -> dict:
    """Refuse Trainer settings that cannot work, before anything is built (one line each), and
    return the settings to change: a typed fractional ``val_check_interval`` counts in epochs,
    so it sets ``check_val_every_n_epoch`` to 1 unless that was typed too.

    Raises:
        UserError: naming the setting, its value and what it must be.
    """
    def bad(key: str, what: str) -> UserError:
        return UserError(f"--trainer.{key} must be {what}, got {trainer.get(key)!r}")

    for key, why in REFUSED_TRAINER.items():
        if trainer.get(key) not in (None, False):
            raise UserError(f"--trainer.{key} is not supported by gptnano: {why}")
    max_steps, max_epochs, max_time = trainer.get("max_steps"), trainer.get("max_epochs"), trainer.get("max_time")
    bounded = (isinstance(max_epochs, int) and max_epochs > 0) or max_time is not None
    if max_steps is None or not (max_steps > 0 or max_steps == -1 and bounded):
        raise UserError(f"--trainer.max_steps must be a positive number of optimizer steps, or -1 with "
                        f"--trainer.max_epochs or --trainer.max_time to bound the run, got {max_steps}")
    interval, changes = trainer.get("val_check_interval"), {}
    if isinstance(interval, float) and 0 < interval <= 1:
        if trainer.get("check_val_every_n_epoch") is None and "trainer.check_val_every_n_epoch" not in typed:
            changes["check_val_every_n_epoch"] = 1  # a fraction of an epoch counts epochs
    elif interval is not None and not (isinstance(interval, int) and interval >= 1 or isinstance(interval, str)
                                       or isinstance(interval, (dict, datetime.timedelta))):
        raise bad("val_check_interval", "a positive number of steps between validations, a fraction of an epoch, "
                  "or a duration")
    for key in ("log_every_n_steps", "accumulate_grad_batches", "num_nodes"):
        if trainer.get(key) is not None and not (isinstance(trainer[key], int) and trainer[key] >= 1):
            raise bad(key, "a whole number >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not clip >= 0:
        raise bad("gradient_clip_val", ">= 0 (0 turns clipping off)")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                "overfit_batches"):
        if trainer.get(key) is not None and not trainer[key] >= 0:
            raise bad(key, ">= 0 (a number of batches, or a fraction of them)")
    if max_time is not None and not _positive_time(max_time):
        raise bad("max_time", "a positive duration such as 00:01:30:00 (DD:HH:MM:SS)")
    return changes


# Trainer arguments gptnano refuses (docs/trainer.md has every argument's row).
REFUSED_TRAINER = {
    "barebones": "it turns off self.log, which gptnano's loss, metrics and checkpoints read; for a bare run give "
                 "--trainer.logger false --trainer.enable_checkpointing false --trainer.enable_progress_bar false",
    "model_registry": "uploading to Lightning's model registry needs its cloud; export the model with "
                      "`gptnano export` instead",
}


CALLBACK_RULES = {  # gptnano's callback settings that cannot work: key -> (test, what it must be)
    "early_stopping.patience": (lambda v: isinstance(v, int) and v >= 0, "a whole number of validations >= 0"),
    "early_stopping.min_delta": (lambda v: v >= 0, ">= 0"),
    "checkpoint.save_top_k": (lambda v: isinstance(v, int) and v >= -1, "-1 (all), 0 (none) or a positive number"),
    "checkpoint.last_every_n_steps": (lambda v: v >= 0, "a number of steps >= 0 (0: off)"),
}


def check_callbacks(config: dict) -> None:
    """Refuse checkpoint and early-stopping settings that cannot work (one line each). ``config`` is the
    command's (``checkpoint`` and ``early_stopping`` in it).

    Raises:
        UserError: naming the setting, its value and what it must be.
    """
    for key, (ok, what) in CALLBACK_RULES.items():
        group, name = key.split(".")
        value = (config.get(group) or {}).get(name)
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
