"""Quiet by default: the Lightning output a gptnano user has nothing to do about.

Each entry below names one message and why it is noise here; anything not
listed is shown, because it asks the user to act. ``gptnano --verbose`` (or
GPTNANO_VERBOSE=1) installs none of these filters and shows everything.
"""

import logging
import warnings

from lightning.pytorch.callbacks import ModelSummary

WARNINGS = {  # regular expression matching the start of the message -> why it is hidden
    r"The '\w+_dataloader' does not have many workers":
        "gptnano's loaders read each batch's windows straight from the prepared token file "
        "(microseconds a batch): worker processes would only add start-up and copies",
    r".*isinstance\(treespec, LeafSpec\)": "torch and Lightning disagree about a pytree API; nothing to act on",
    r"The dirpath has changed from": "validating or predicting from another folder than the run's",
    r"Couldn't infer the batch indices": "LitLM.predict_step returns the prompt numbers itself",
    r"Precision \S+-mixed is not supported by the model summary":
        "mixed precision keeps the weights in fp32, so the 32-bit size the summary falls back to is right",
    r"Your `IterableDataset` has `__len__` defined":
        "gptnano's windows are read in the main process (no workers), so the length is exact",
    r"The number of training batches \(\d+\) is smaller than the logging interval":
        "gptnano logs every log_every_n_steps optimizer steps over the whole run, not within one epoch",
    r"You requested to overfit but enabled \w+ dataloader shuffling":
        "gptnano's windows are never shuffled by a sampler: under overfit_batches the training stream "
        "starts at batch 0 of every epoch, so batch i is the same each time",
    r"Checkpoint directory .* exists and is not empty":
        "a fit writes into a folder with checkpoints only when it resumes that run (the CLI refuses a fresh "
        "run there), so the folder holds the run's own checkpoints on purpose",
}
MESSAGES = {  # start of a Lightning info line -> why it is hidden
    "💡 Tip:": "advertisements for Lightning's cloud services",
    "TPU available: False": "no TPU, nothing to decide",
    "Trainer already configured with model summary callbacks":
        "the ModelSummary is gptnano's own (its table without the empty FLOPs column), or the user's",
    "`Trainer.fit` stopped:": "gptnano's own end-of-run line (gptnano/train/report.py) says why, and where the "
                              "checkpoints are",
    "Time limit reached.": "the end-of-run line says so (max_time)",
    "Loading `train_dataloader` to estimate": "the schedule's length with max_steps -1 (LitLM.decay_steps): "
                                              "nothing to act on",
}
# Lightning prints its start-up lines through these loggers (rank_zero_info).
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _HideMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(tuple(MESSAGES))


def hide_noise() -> None:
    """Install the filters for WARNINGS and MESSAGES in this process."""
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(_HideMessages())


class SummaryWithoutFlops(ModelSummary):
    """Lightning's model summary less its FLOPs column and total. Lightning counts FLOPs by
    running the module's ``example_input_array`` at start-up; LitLM has none (that forward
    pass would fail on FSDP's sharded weights), so the column would be all zeros. MFU in the
    progress bar and TensorBoard comes from the network's own ``flops_per_token()``."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:  # a module with an example input: the counts mean something
            return ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                          total_training_modes, total_flops, **summarize_kwargs)
        # Lightning's table formatter is private: tests/test_commands.py fails if it changes.
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        kept = [line for line in table.splitlines() if not line.endswith("Total Flops")]
        logging.getLogger(ModelSummary.__module__).info("\n" + "\n".join(kept))


def drop_flops_column(callbacks: list) -> None:
    """Have the trainer's ModelSummary (Lightning's default, or one a user passed, settings
    kept) print its table without the FLOPs column."""
    for callback in callbacks:
        if type(callback) is ModelSummary:
            callback.__class__ = SummaryWithoutFlops
