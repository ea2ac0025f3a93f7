"""Lightning's four `gptnano` commands (fit, validate, test, predict; gptnano/commands.py
sends them here): LightningCLI with the defaults a user of this tool expects.

What it adds to LightningCLI: checkpoints in a fixed folder per run
(``checkpoints/<run_name>/``) so ``--ckpt_path last`` and ``best`` work from a new
process, hyper-parameters and vocabulary read from ``--ckpt_path`` *before* the
classes are built (so ``predict --ckpt_path X`` needs nothing else), and
one-line errors instead of tracebacks for mistakes a user can fix.
"""

import sys
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptnano import quiet
from gptnano.board import RunSettings
from gptnano.callbacks import Checkpoint, PredictionWriter, TextSample, Throughput
from gptnano.checkpoint import read_checkpoint
from gptnano.commands import TOOLS
from gptnano.data import ShakespeareDataModule
from gptnano.errors import UserError
from gptnano.lit import LitLM
from gptnano.models import MODELS  # importing registers every architecture for --model.net NAME


def _argv_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


class Parser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        # The full usage runs to a hundred lines and buries the error under it.
        (file or sys.stdout).write(f"usage: {self.prog} [options]\n")


def _architecture_names(argv: list[str]) -> list[str]:
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


class GPTNanoCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            LitLM,
            ShakespeareDataModule,
            seed_everything_default=1337,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # LitLM.configure_optimizers owns AdamW + schedule
            trainer_defaults={
                "gradient_clip_val": 1.0,
                "max_steps": 2000,
                "val_check_interval": 250,
                "check_val_every_n_epoch": None,
                "callbacks": [LearningRateMonitor("step"), Throughput(), TextSample(), PredictionWriter(), RunSettings()],
            },
            parser_class=Parser,
            parser_kwargs={"prog": "gptnano", "description": "Train and sample small language models written from "
                           "scratch. Also: " + "; ".join(f"gptnano {k}: {v}" for k, (_, v) in TOOLS.items()) + "."},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Name of the run: checkpoints go to checkpoints/<run_name>/ and logs to "
                                 "lightning_logs/<run_name>/ (default: the architecture's name, e.g. gpt).")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss",
            "checkpoint.filename": "best",
            "checkpoint.save_top_k": 1,
            "checkpoint.save_last": True,
        })
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/loss", "early_stopping.patience": 10})
        parser.link_arguments("data.vocab_size", "model.net.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")

    # ----- a checkpoint supplies defaults, the command line still wins ------
    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict):
            return super().parse_arguments(parser, args)
        argv = _architecture_names(sys.argv[1:] if args is None else args)
        subcommand = next((a for a in argv if a in self.subcommands()), None)
        ckpt = self._checked_ckpt = _argv_value(argv, "--ckpt_path")
        if subcommand and ckpt and ckpt not in ("last", "best"):
            hparams = read_checkpoint(ckpt)["hyper_parameters"]
            defaults = {f"model.{k}": v for k, v in hparams.items() if not k.startswith("_")}
            defaults["data.vocab"] = hparams.get("vocab") or None
            parser._subcommands_action._name_parser_map[subcommand].set_defaults(defaults)
        self.config = parser.parse_args(argv)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        quiet.drop_flops_column(trainer.callbacks)
        # fp32 matrix products on CUDA run as TF32 on tensor cores (Ampere and later: a 10-bit
        # mantissa, as nanoGPT trains). Chosen here on purpose, which also answers the hint Lightning
        # prints otherwise; CPU products stay exact fp32 (this flag is CUDA's only).
        torch.backends.cuda.matmul.allow_tf32 = True
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Replaced by ``parse_arguments`` above: Lightning's version lets the
        checkpoint override what the user typed (``--model.max_new_tokens``)."""

    # ----- run folders and --ckpt_path last/best ----------------------------
    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        name = cfg.run_name or cfg.model.net.class_path.rsplit(".", 1)[-1].lower()
        cfg.run_name = name
        folder = Path(cfg.checkpoint.dirpath or Path("checkpoints") / name)
        cfg.checkpoint.dirpath = str(folder)
        if cfg.trainer.logger in (None, True):  # default logger: TensorBoard, one folder per run name
            cfg.trainer.logger = Namespace(class_path="gptnano.board.Board",
                                           init_args=Namespace(save_dir="lightning_logs", name=name))
        if sub == "predict":
            cfg.trainer.enable_progress_bar = False  # stdout carries the generated text and nothing else
        ckpt = cfg.get("ckpt_path")
        if ckpt in ("last", "best"):
            path = folder / f"{ckpt}.ckpt"
            if not path.is_file():
                action = "resume" if sub == "fit" else sub
                raise UserError(f"--ckpt_path {ckpt}: no {path} to {action} from (train first, or pass a checkpoint file)")
            cfg.ckpt_path = str(path)
        elif ckpt and ckpt != getattr(self, "_checked_ckpt", None):  # given in a config file
            read_checkpoint(ckpt)
        elif sub == "fit" and (folder / "last.ckpt").exists():
            raise UserError(f"{folder} already holds a run: resume it with --ckpt_path last, "
                            f"or start a new one with --run_name NAME (or delete {folder})")


def run(argv: list[str], verbose: bool = False) -> None:
    """Run one of Lightning's four commands (gptnano/commands.py sends them here)."""
    if not verbose:
        quiet.hide_noise()
    try:
        GPTNanoCLI(args=argv)
    except SIGTERMException:
        print("gptnano: interrupted; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(143)


def main(args=None) -> None:
    """The ``gptnano`` command, for Python callers (the console script calls gptnano.commands.main)."""
    from gptnano.commands import main as command

    command(args)


if __name__ == "__main__":
    main()
