"""What TensorBoard shows for a run, in words a user reads at a glance.

Scalars are grouped by what they measure (TensorBoard draws one section per
prefix):

    train/loss                    loss of each training batch (nats per character)
    val/loss, val/bpc, val/ppl    full validation pass: loss, bits per character, perplexity
    perf/tok_s, perf/mfu          training tokens per second, model FLOPs utilisation
    lr/...                        learning rate of each optimizer parameter group
    hp_metric                     best val/loss so far: with val/loss, the metrics of the HPARAMS tab
    health/<block>/...            with TrainingHealth on (gptnano/train/health.py): each block's health

and under *Text* a sample generated at each validation, headed by its step and
sampling settings. A step is the number of optimizer updates the scored weights
have had: ``train/loss`` at step s is the loss before update s + 1, ``val/loss``
at step s the loss after update s. The HPARAMS tab lists each run's
hyper-parameters (model, optimizer, batch size, steps, precision, seed) next to
its best validation loss and its last one (``val/loss``: the loss `gptnano compare`
ranks runs by, once their schedule has finished). ``epoch`` is Lightning's: the epoch each step is in (an
epoch reads the training split about once, docs/trainer.md).
"""

import math
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from gptnano.errors import WriteError
from gptnano.files import os_error_in, write_error
from gptnano.train.checkpointing import own_checkpoint

BEST_OF = "val/loss"  # hp_metric is the lowest value of this tag


def tensorboard_tag(name: str) -> str:
    """The tag a metric is written under. Our own metrics are logged under their final names; this
    maps the ones Lightning names itself."""
    if name.startswith("lr-"):  # LearningRateMonitor: lr-<Optimizer>[/pg<N>]
        return "lr/" + name.removeprefix("lr-")
    return name


def hparams_table(params, prefix: str = "") -> dict:
    """One HPARAMS column per setting: nested settings flattened with dots, a network as its
    class name and its arguments (``net`` = GPT, ``net.n_layer`` = 4), anything that is not a
    number, string or bool as text. The vocabulary and LightningCLI's private keys are left
    out: they are not settings one compares runs by."""
    table = {}
    for key, value in params.items():
        if key == "vocab" or key.startswith("_"):
            continue
        name = prefix + key
        if hasattr(value, "items") and "class_path" in value:
            table[name] = value["class_path"].rsplit(".", 1)[-1]
            table.update(hparams_table(value.get("init_args") or {}, name + "."))
        elif hasattr(value, "items"):
            table.update(hparams_table(value, name + "."))
        else:
            table[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return table


class Board(TensorBoardLogger):
    """Lightning's TensorBoardLogger with gptnano's tags (module docstring): ``epoch`` left
    out, the learning rates under ``lr/``, ``hp_metric`` the best validation loss instead of
    Lightning's -1 placeholder, and the HPARAMS session written once every setting has
    arrived (just before the first scalar). A write the OS refuses (a full disk) is one
    ``WriteError`` naming the log folder, not a traceback from TensorBoard's writer thread.

    Args:
        save_dir: Folder of all runs' logs.
        name: The run's folder in it.
        version: Version folder (default: the next free version_N).
        step: Log every metric at this step: validate, test and predict of a checkpoint log at the
            optimizer step of the weights they scored (Lightning would log at 0). None: Lightning's step.
    """

    def __init__(self, save_dir: str = "lightning_logs", name: str = "lightning_logs", version: int | str | None = None,
                 step: int | None = None):
        super().__init__(save_dir, name=name, version=version, default_hp_metric=False)
        self.best = math.inf
        self.step = step
        self._session_written = False

    @contextmanager
    def _writing(self):
        """TensorBoard's writes (made in a thread, their error raised at a later write) as one line."""
        try:
            yield
        except Exception as e:
            refused = os_error_in(e)
            if refused is None:
                raise
            raise write_error(refused.filename or self.log_dir, refused,
                              "the run's checkpoints are not affected (they are written whole or not at all)") from None

    @property
    def experiment(self):
        with self._writing():  # made on first use: its event file is written at once
            return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        with self._writing():
            if not self._session_written:
                self._write_hparams_session()
            tagged = {tensorboard_tag(k): v for k, v in metrics.items()}
            if BEST_OF in tagged:
                self.best = min(self.best, float(tagged[BEST_OF]))
                tagged["hp_metric"] = self.best
            if tagged:
                super().log_metrics(tagged, step if self.step is None else self.step)

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None, step=None) -> None:
        with self._writing():
            super().log_hyperparams(params, metrics, step)

    @rank_zero_only
    def save(self) -> None:
        with self._writing():
            super().save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            with self._writing():
                super().finalize(status)
        except WriteError:
            if status == "success":
                raise
            # The run failed already, and that error is the one to report.

    def _write_hparams_session(self) -> None:
        """The HParams plugin's records for this run: its settings, and hp_metric and val/loss
        declared as its metrics (the tab shows the last value of each: the best and the latest
        validation loss)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries  # 40 ms: only when logging

        for summary in hparams_summaries(hparams_table(self.hparams), {"hp_metric": math.nan, BEST_OF: math.nan}):
            self.experiment.file_writer.add_summary(summary)
        self._session_written = True


def place_board(logger, *, run: str, root: str | None, step: int, save_dir_typed: bool, evaluating: bool):
    """The ``trainer.logger`` config with gptnano's TensorBoard logger (``Board``) in the run's folder:
    ``<logs>/<run>/version_N`` for training, ``<logs>/<run>/eval/version_N`` for validate, test and
    predict, at the ``step`` of the checkpoint they read. ``<logs>`` is ``<root>/lightning_logs``, or
    the Board's ``save_dir`` where one was typed. A logger the user gives alone replaces it, as in
    Lightning; a list keeps it beside theirs; ``false`` trains without any."""
    board_class = f"{Board.__module__}.{Board.__name__}"
    boards = [x for x in (logger if isinstance(logger, list) else [logger])
              if getattr(x, "class_path", None) == board_class]
    typed = save_dir_typed and boards and boards[0].init_args.get("save_dir")
    logs = Path(boards[0].init_args.save_dir) if typed else Path(root or ".") / "lightning_logs"
    init = {"save_dir": str(logs / run), "name": "eval", "step": step} if evaluating \
        else {"save_dir": str(logs), "name": run}
    if logger in (None, True):
        logger = Namespace(class_path=board_class, init_args=Namespace())
        boards = [logger]
    elif isinstance(logger, list) and not boards:
        boards = [Namespace(class_path=board_class, init_args=Namespace())]
        logger.append(boards[0])
    for found in boards:
        for key, value in init.items():
            found.init_args[key] = value
    return logger


class RunSettings(L.Callback):
    """Hands every logger the run settings that are not the model's hyper-parameters (batch size,
    steps, epochs, precision, world size, seed), so that hparams.yaml, the HPARAMS tab and a user's
    own logger (CSVLogger, WandbLogger) show them beside the model's; and starts a resumed run's
    ``hp_metric`` from the best loss before the restart."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule
        settings = {
            "data.batch_size": getattr(data, "batch_size", None),
            "trainer.max_steps": trainer.max_steps,
            "trainer.max_epochs": trainer.max_epochs,
            "trainer.precision": str(trainer.precision),
            "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size,
            "seed": torch.initial_seed(),  # the run's seed (seed_everything), before any re-seeding
        }
        for logger in trainer.loggers:
            logger.log_hyperparams(settings)

    def on_train_start(self, trainer, pl_module) -> None:
        score = getattr(own_checkpoint(trainer), "best_model_score", None)
        for logger in trainer.loggers:
            if isinstance(logger, Board) and score is not None:
                logger.best = min(logger.best, float(score))
