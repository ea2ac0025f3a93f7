"""What a run keeps of itself: the config it was parsed into, with its weights.

``RunConfig`` is LightningCLI's ``SaveConfigCallback``, the public place a CLI's config
reaches the run. It writes ``config.yaml`` into the run's own folder, and into every
checkpoint one record, ``checkpoint["gptnano"]``: the resolved config (plain data, loadable
with ``weights_only=True``) and beside it the facts the config was parsed before — the
vocabulary, the device, the precision and Muon's dtype, and the text's resolved path and
sha256. Every command that starts from a checkpoint parses on top of that config
(gptnano/cli/lightning.py, gptnano/cli/settings.py); ``gptnano.checkpoint.run_config`` reads it back.
"""

import enum
from importlib.metadata import version
from pathlib import Path

import yaml
from jsonargparse import set_dumper
from lightning.pytorch.cli import SaveConfigCallback

from gptnano.files import atomic_write
from gptnano.train.optim import MuonAdamW


def _yaml_dump(data) -> str:
    """jsonargparse's YAML dump, also for the enum defaults of some Lightning callbacks (Timer's
    ``interval``), which yaml's safe dumper refuses: written as their value, which parses back."""
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_multi_representer(enum.Enum, lambda d, e: d.represent_data(e.value))
    return yaml.dump(data, Dumper=Dumper, default_flow_style=False, allow_unicode=True, sort_keys=False)


set_dumper("yaml", _yaml_dump)


def dump_config(parser, config) -> str:
    """A parsed config as YAML, its None values kept (what the run ran with, every key): jsonargparse's
    ``skip_unset=False``, named ``skip_none`` before 4.49 (which still takes it, with a deprecation)."""
    major, minor = (int(x) for x in version("jsonargparse").split(".")[:2])
    keep_none = {"skip_unset": False} if (major, minor) >= (4, 49) else {"skip_none": False}
    return parser.dump(config, **keep_none)


def run_folder(trainer) -> Path | None:
    """Where a run's config.yaml goes: its first logger's version folder, else (no logger) the run's
    checkpoint folder, never the working folder Lightning would fall back to."""
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            return Path(logger.log_dir)
    folders = [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
    return Path(folders[0]) if folders else None


class RunConfig(SaveConfigCallback):
    """LightningCLI's config saver, writing into the run's folder and into every checkpoint
    (module docstring). Construct it through LightningCLI (``save_config_callback``) with
    ``save_to_log_dir=False``: ``save_config`` below is where the file goes."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        folder = run_folder(trainer)
        if folder is None or trainer.fast_dev_run:
            return  # fast_dev_run writes nothing (Lightning's promise), so a real run of the name can follow
        atomic_write(folder / self.config_filename, dump_config(self.parser, self.config))

    def plain_config(self) -> dict:
        if not hasattr(self, "_plain"):
            self._plain = yaml.safe_load(dump_config(self.parser, self.config))
        return self._plain

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        optimizers = trainer.optimizers
        muon = optimizers[0].ns_dtype if optimizers and isinstance(optimizers[0], MuonAdamW) else None
        record = {"config": self.plain_config(), "vocab": pl_module.hparams.get("vocab"),
                  "tokenizer": pl_module.hparams.get("tokenizer"), "device": pl_module.device.type,
                  "precision": str(trainer.precision), "muon_dtype": str(muon).removeprefix("torch.") if muon else None}
        data = trainer.datamodule
        if getattr(data, "prepared", None) is not None:
            record["text"] = {"path": str(data.text_path.resolve()), "sha256": data.corpus.scan(verbose=False).sha256}
        checkpoint["gptnano"] = record
