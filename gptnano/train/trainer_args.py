"""The Trainer settings gptnano refuses before anything is built, one line each: the arguments
it does not support (docs/trainer.md audits every argument of Lightning's Trainer,
tests/test_trainer_args.py checks the table against ``Trainer.__init__``), values that cannot
work, and its own checkpoint and early-stopping settings. Pure functions on plain dicts: no
Lightning here.
"""

import datetime

from gptnano.errors import UserError

# Trainer arguments gptnano refuses (docs/trainer.md has every argument's row).
REFUSED_TRAINER = {
    "barebones": "it turns off self.log, which gptnano's loss, metrics and checkpoints read; for a bare run give "
                 "--trainer.logger false --trainer.enable_checkpointing false --trainer.enable_progress_bar false",
    "model_registry": "uploading to Lightning's model registry needs its cloud; export the model with "
                      "`gptnano export` instead",
}


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
