"""A WandbLogger that also keeps what it was handed, so a test can compare it with another logger's
files: wandb's offline run is a binary record only its own service reads."""

from lightning.pytorch.loggers import WandbLogger


class RecordingWandb(WandbLogger):
    metrics: list[dict] = []  # every log_metrics call of every instance, in order
    hparams: list[dict] = []

    def log_metrics(self, metrics, step=None):
        RecordingWandb.metrics.append(dict(metrics))
        super().log_metrics(metrics, step)

    def log_hyperparams(self, params, *args, **kwargs):
        RecordingWandb.hparams.append(dict(params))
        super().log_hyperparams(params, *args, **kwargs)
