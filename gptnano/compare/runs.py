"""What the runs of a `gptnano compare` are: its entries (a config at a grid point), the fit
flags compare sets itself and refuses from the user, and each run's identity (the hash that
tells a rerun which recorded runs are still its own), size and devices. No Lightning here.
"""

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from gptnano.compare import budgets
from gptnano.errors import UserError

# Flags of `fit` that a comparison sets for every run itself -> why the user may not.
OWNED = {
    "trainer.max_steps": "--budget sets each run's steps",
    "trainer.max_time": "--budget sets each run's length (a time limit would cut its schedule short)",
    "seed_everything": "--seeds sets it, together with data.seed",
    "data.seed": "--seeds sets it, together with seed_everything",
    "run_name": "runs are named after their config, grid point and seed",
    "ckpt_path": "compare resumes an interrupted run from its last.ckpt itself",
    "trainer.val_check_interval": "--validations sets it, so that the last step is a validation",
    "model.lr_decay_steps": "the learning rate decays over each run's budget",
    "checkpoint.dirpath": "runs keep their checkpoints under compare/NAME/",
    "trainer.logger": "runs log under compare/NAME/lightning_logs/",
    "early_stopping": "every run finishes its schedule",
    "print_config": "--dry_run shows what each run would be",
}
# Settings that change nothing a comparison measures: left out of a run's hash.
COSMETIC = ("trainer.enable_progress_bar", "trainer.enable_model_summary", "weights_only")


def _no_limit(value) -> bool:
    return value is None


def _whole(value) -> bool:  # a fraction 1.0 of the batches (the int 1 is one batch)
    return value is None or isinstance(value, float) and value == 1.0


# Settings of a resolved config (from a config file or a fit flag alike) that would end a run before its
# budget, or change what it means, and that compare turns off for every run (said in one line): key ->
# (whether a value is already off, what the setting would do).
TURNED_OFF = {
    "trainer.max_time": (_no_limit, "a time limit ends a run before its schedule"),
    "trainer.max_epochs": (lambda v: v in (None, -1), "an epoch limit ends a run before its schedule"),
    "trainer.min_epochs": (_no_limit, "the budget alone bounds a run"),
    "trainer.min_steps": (_no_limit, "the budget alone bounds a run"),
    "trainer.limit_train_batches": (_whole, "shorter epochs move validations off the schedule's steps"),
    "trainer.check_val_every_n_epoch": (_no_limit, "validations by epoch miss the schedule's last step"),
    "trainer.default_root_dir": (_no_limit, "each run's outputs go under compare/NAME/"),
    "early_stopping.stopping_threshold": (_no_limit, "it stops a run once the loss is low enough"),
    "early_stopping.divergence_threshold": (_no_limit, "it stops a run whose loss is high"),
    "early_stopping.check_on_train_epoch_end": (lambda v: v in (None, False), "it counts epochs, not validations"),
}
# Settings compare refuses, wherever they come from: key -> (whether a value is harmless, why).
REFUSED = {
    "trainer.fast_dev_run": (lambda v: v in (None, False, 0), "it trains a few steps and keeps nothing"),
    "trainer.overfit_batches": (lambda v: v in (None, 0), "it trains on the same few batches again and again"),
    "trainer.limit_val_batches": (_whole, "each run's final loss would be measured on part of the validation split"),
}
# Callbacks that can stop a run, or change its steps, before its budget: class path -> (whether an
# instance's init_args are harmless, why).
REFUSED_CALLBACKS = {
    "lightning.pytorch.callbacks.EarlyStopping": (lambda a: False, "it can stop a run before its budget"),
    "lightning.pytorch.callbacks.Timer": (lambda a: a.get("duration") is None, "its duration stops a run"),
    "lightning.pytorch.callbacks.GradientAccumulationScheduler":
        (lambda a: False, "it changes the tokens of a step during the run, which the budget counts"),
    "gptnano.train.budget.TimeBudget": (lambda a: False, "it sets a run's steps from its own wall time; use --budget"),
}
TENSORBOARD = ("gptnano.train.logger.Board", "lightning.pytorch.loggers.TensorBoardLogger")


# ----- fit flags, grids and configs ------------------------------------------------------
def is_option(token: str) -> bool:
    """Whether a command-line token is a flag (``--model.x``), not a value (``-1`` is a value)."""
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
        return False  # a negative number is a value
    except ValueError:
        return True


def flag_key(token: str) -> str:
    """``--model.init_args.dropout=0.1`` -> ``model.dropout``."""
    return token.lstrip("-").split("=", 1)[0].replace(".init_args.", ".")


def owned_reason(key: str) -> str | None:
    for owned, why in OWNED.items():
        if key == owned or key.startswith(owned + "."):
            return why
    return None


def check_fit_flags(fit_flags: list[str]) -> None:
    for token in fit_flags:
        if is_option(token) and (why := owned_reason(flag_key(token))):
            raise UserError(f"{token.split('=', 1)[0]} is set by compare for every run ({why})")


def _at(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def _is_a(class_path: str, refused: str) -> bool:
    """Whether ``class_path`` names ``refused`` or a subclass of it (imported to know: Lightning is
    loaded already once a config is resolved)."""
    if class_path == refused or class_path.rsplit(".", 1)[-1] == refused.rsplit(".", 1)[-1]:
        return True
    import importlib

    try:
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        module, name = refused.rsplit(".", 1)
        return issubclass(cls, getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError, TypeError):
        return False


def turned_off(config: dict) -> dict[str, object]:
    """The settings of a resolved fit config that would end a run before its budget or change what
    it means, and that compare turns off for every run: key -> the config's value. (``trainer.logger``:
    a logger other than TensorBoard, which compare replaces by its own, since it reads TensorBoard.)

    Raises:
        UserError: for a setting compare cannot turn off (REFUSED, REFUSED_CALLBACKS).
    """
    for key, (harmless, why) in REFUSED.items():
        if not harmless(value := _at(config, key)):
            raise UserError(f"{key}={value}: {why}; leave it out of a comparison")
    callbacks = _at(config, "trainer.callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        path = callback.get("class_path", "") if isinstance(callback, dict) else ""
        for refused, (harmless, why) in REFUSED_CALLBACKS.items():
            if path and _is_a(path, refused) and not harmless(callback.get("init_args") or {}):
                raise UserError(f"trainer.callbacks has {path}: {why}; leave it out of a comparison")
    found = {key: value for key, (off, _) in TURNED_OFF.items() if not off(value := _at(config, key))}
    loggers = _at(config, "trainer.logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    others = [x.get("class_path") if isinstance(x, dict) else x for x in loggers
              if x not in (None, True) and not (isinstance(x, dict) and x.get("class_path") in TENSORBOARD)]
    if others:
        found["trainer.logger"] = ", ".join(str(o).rsplit(".", 1)[-1] for o in others)
    return found


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``model.muon_lr=0.01,0.02`` -> [("model.muon_lr", ["0.01", "0.02"])], one per --grid."""
    grid = []
    for spec in specs:
        key, _, values = spec.partition("=")
        key = flag_key(key.strip())
        items = [v.strip() for v in values.split(",")]
        if not key or not values or any(v == "" for v in items):
            raise UserError(f"bad --grid {spec!r}: give KEY=V1,V2,... (e.g. model.muon_lr=0.01,0.02)")
        if why := owned_reason(key):
            raise UserError(f"--grid {key}: set by compare for every run ({why})")
        if key in (k for k, _ in grid):
            raise UserError(f"--grid {key} is given twice: list all its values in one --grid")
        grid.append((key, items))
    return grid


def check_config(path: str) -> None:
    """A CONFIG must be a readable YAML mapping (the real parser checks its keys later)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config not found: {path}")
    try:
        content = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = " ".join(str(e).split())[:160]
        raise UserError(f"{path} is not a readable YAML config: {first}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a config: its YAML is not a mapping of settings")


# ----- entries: a config at a grid point -------------------------------------------------
@dataclass
class Point:
    config: str
    grid: dict[str, str]
    label: str
    name: str = ""  # the config's name in labels (its stem, or its path where two configs share a stem)
    facts: dict = field(default_factory=dict)  # what fit's parser resolved (gptnano/compare/resolve.py), and more

    def flags(self) -> list[str]:
        return [a for key, value in self.grid.items() for a in (f"--{key}", value)]


def safe_name(text: str) -> str:
    """A folder name from any text: letters, digits and ._=,+- kept, the rest as _."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text).strip("._") or "run"


def make_points(configs: list[str], grid: list[tuple[str, list[str]]]) -> list[Point]:
    stems = [Path(c).stem for c in configs]
    # A config's name, or its path where two configs share a name (configs/gpt.yaml, configs/gpu/gpt.yaml).
    names = [s if stems.count(s) == 1 else safe_name(str(Path(c).with_suffix("")))
             for s, c in zip(stems, configs)]
    if len(set(names)) < len(names):
        raise UserError("a config is given twice")
    points = []
    for config, name in zip(configs, names):
        for values in itertools.product(*[v for _, v in grid]):
            assignment = dict(zip([k for k, _ in grid], values))
            shown = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in assignment.items())
            points.append(Point(config, assignment, safe_name(name + (f"-{shown}" if shown else "")), name))
    if len({p.label for p in points}) < len(points):
        raise UserError("two grid keys end in the same name: their runs would be named alike")
    return points


# ----- what a run is -----------------------------------------------------------------------
def _without(config: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        config = config.get(p) if isinstance(config, dict) else None
    if isinstance(config, dict):
        config.pop(last, None)


def config_hash(config: dict, budget: budgets.Budget, seed: int, validations: int, text_sha256: str) -> str:
    """The identity of a run: its resolved configuration (less what compare sets per run and
    what changes nothing measured), its budget, seed and validations, and the text's content."""
    config = copy.deepcopy(config)
    for key in (*OWNED, *COSMETIC):
        _without(config, key)
    blob = json.dumps({"config": config, "budget": [budget.kind, budget.amount], "seed": seed,
                       "validations": validations, "text": text_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def pinned_accelerator(trainer: dict, device: str) -> str | None:
    """The ``--trainer.accelerator`` every run of an entry gets, or None (its own setting stands).

    A fit given no accelerator on a machine that has one times it against the CPU and may pick
    either (gptnano/devices.py), run by run; a comparison plans for one device (``device``,
    Lightning's rule, which picks the accelerator) and gives it to every run, so that no entry
    trains on another device than the others. A CPU-only machine has nothing to pin."""
    return device if trainer.get("accelerator") in (None, "auto") and device != "cpu" else None


def world_size(trainer: dict, device: str, parallel: int) -> int:
    """Processes a run trains in (devices x nodes), as Lightning will count them."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif device == "cuda" and parallel == 1:  # "auto" or -1: every GPU it sees
        import torch

        n = torch.cuda.device_count()
    else:
        n = 1
    return n * int(trainer.get("num_nodes") or 1)


def eval_batches(facts: dict) -> int:
    """Validation batches of one pass (gptnano/data/datamodule.py's split and windows)."""
    data, n, block = facts["config"]["data"], facts["n_tokens"], facts["block_size"]
    val = int(n * (1 - data["test_fraction"])) - int(n * (1 - data["val_fraction"] - data["test_fraction"]))
    windows = math.ceil(max(1, val - 1) / block)
    if data.get("val_tokens"):
        windows = min(windows, math.ceil(data["val_tokens"] / block))
    return math.ceil(windows / data["eval_batch_size"])


@dataclass
class Run:
    name: str
    point: Point
    seed: int
    hash: str
    record: dict | None = None  # runs/<name>.json, once started

    @property
    def done(self) -> bool:
        return bool(self.record) and self.record.get("status") == "done"

    @property
    def failed(self) -> bool:
        return bool(self.record) and self.record.get("status") == "failed"


NON_FINITE = re.compile(r"the loss became non-finite at step (\d+)")


def failure(error_line: str | None, last_line: str, code: int) -> str:
    """What a failed fit's record says: ``diverged at step N``, the fit's error line, or (a crash
    without one) its exit status and last line of output."""
    if error_line and (m := NON_FINITE.search(error_line)):
        return f"diverged at step {m.group(1)}"
    return error_line or f"exit {code}: {last_line}"


STOP_STATUS = {130: "SIGINT", 143: "SIGTERM", 129: "SIGHUP"}  # how `gptnano fit` exits when a signal stops it


def stopped_by_signal(code: int) -> bool:
    """Whether a fit's exit status says a signal stopped it (it saved last.ckpt, or was killed):
    the run is interrupted, not failed, and resumes on a rerun."""
    return code < 0 or code in STOP_STATUS
