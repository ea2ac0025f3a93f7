"""Lightning's four `gptnano` commands (fit, validate, test, predict; gptnano/cli/main.py
sends them here): LightningCLI with the defaults a user of this tool expects.

What it adds to LightningCLI: checkpoints in a fixed folder per run
(``checkpoints/<run_name>/``) so ``--ckpt_path last`` and ``best`` work from a new
process; the network's sizes, the vocabulary and the run's settings read from the
checkpoint that ``--ckpt_path`` names *before* the classes are built (so a run
resumes, validates and predicts from its checkpoint alone, whatever flags it was
started with); the device and the precision chosen for the machine when none is
given (the device by timing the run's own model, gptnano/devices.py); steps that
count optimizer updates under gradient accumulation; progress as plain lines when
the output is a file; and one-line errors instead of tracebacks for mistakes a user
can fix.
"""

import copy
import inspect
import os
import sys
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptnano import devices, hardware, lines
from gptnano.checkpoint import architecture, build_net, read_checkpoint
from gptnano.cli import quiet, settings
from gptnano.cli.commands import TOOLS
from gptnano.data.datamodule import ShakespeareDataModule
from gptnano.errors import ConfigError, UserError
from gptnano.train.callbacks import PredictionWriter, TextSample, Throughput
from gptnano.train.checkpointing import CTRL_C, AtomicCheckpointIO, Checkpoint
from gptnano.train.guard import NonFiniteGuard
from gptnano.train.logger import RunSettings
from gptnano.train.module import LitLM
from gptnano.train.progress import LogLines, is_terminal
from gptnano.train.steps import OPTIMIZER_SETTINGS, training_step

_MODEL_ARGS = set(inspect.signature(LitLM.__init__).parameters) - {"self"}


def subcommand_parser(parser, name: str):
    """The parser of one subcommand (jsonargparse keeps them in a private map; tests/test_dependencies.py
    fails loudly if that changes)."""
    return parser._subcommands_action._name_parser_map[name]


class Parser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        # The full usage runs to a hundred lines and buries the error under it.
        (file or sys.stdout).write(f"usage: {self.prog} [options]\n")


class GPTNanoCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        self._checkpoints = {}  # path -> checkpoint: read once, though parsing and building both need it
        self._resumed = None  # the checkpoint `fit --ckpt_path` resumes
        super().__init__(
            LitLM,
            ShakespeareDataModule,
            seed_everything_default=1337,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # LitLM.configure_optimizers owns Muon/AdamW + schedule
            trainer_defaults={
                "gradient_clip_val": 1.0,
                "max_steps": 2000,
                "val_check_interval": 250,
                "check_val_every_n_epoch": None,
                "callbacks": [LearningRateMonitor("step"), Throughput(), TextSample(), PredictionWriter(), RunSettings(),
                              NonFiniteGuard()],
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
        parser.link_arguments("data.tokenizer_kind", "model.tokenizer", apply_on="instantiate")

    # ----- a checkpoint supplies the run's settings, typed flags win (gptnano/cli/settings.py) ----
    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict):
            self._typed = set()
            return super().parse_arguments(parser, args)
        argv = settings.moved_class_paths(settings.architecture_names(sys.argv[1:] if args is None else args))
        cmd = settings.read_command_line(argv, self.subcommands())
        self._typed = cmd.typed
        ckpt = settings.checkpoint_named(cmd)
        if cmd.subcommand and ckpt:
            # As defaults, so that `predict --ckpt_path X` needs no --config or --model.net;
            # before_instantiate_classes then makes the checkpoint win over config files too.
            defaults = settings.parser_defaults(self._read_checkpoint(ckpt)["hyper_parameters"], _MODEL_ARGS)
            subcommand_parser(parser, cmd.subcommand).set_defaults(defaults)
        self.config = parser.parse_args(argv)

    def _parse_ckpt_path(self) -> None:
        """Replaced by ``parse_arguments`` above: Lightning's version lets the
        checkpoint override what the user typed (``--model.max_new_tokens``)."""

    # ----- run folders and --ckpt_path last/best ----------------------------
    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        name = cfg.run_name or cfg.model.net.class_path.rsplit(".", 1)[-1].lower()
        cfg.run_name = name
        if "run_name" in self._typed and "checkpoint.dirpath" not in self._typed:
            cfg.checkpoint.dirpath = None  # a typed run name moves the run, whatever a saved config.yaml pinned
        folder = Path(cfg.checkpoint.dirpath or Path("checkpoints") / name)
        cfg.checkpoint.dirpath = str(folder)
        if cfg.trainer.logger in (None, True):  # default logger: TensorBoard, one folder per run name
            cfg.trainer.logger = Namespace(class_path="gptnano.train.logger.Board",
                                           init_args=Namespace(save_dir="lightning_logs", name=name))
        elif getattr(cfg.trainer.logger, "class_path", None) == "gptnano.train.logger.Board":
            # A saved config.yaml names the logger with its old run's name: logs follow the run.
            cfg.trainer.logger.init_args.name = name
        if sub == "predict":
            cfg.trainer.enable_progress_bar = False  # stdout carries the generated text and nothing else
        ckpt, saved = cfg.get("ckpt_path"), None
        if ckpt in ("last", "best"):
            path = folder / f"{ckpt}.ckpt"
            if not path.is_file():
                action = "resume" if sub == "fit" else sub
                raise UserError(f"--ckpt_path {ckpt}: no {path} to {action} from (train first, or pass a checkpoint file)")
            cfg.ckpt_path = ckpt = str(path)
        if ckpt:
            saved = self._read_checkpoint(ckpt)
            self._take_from_checkpoint(cfg, saved, ckpt)
        resuming_here = bool(ckpt) and Path(ckpt).resolve().parent == folder.resolve()
        if sub == "fit" and (folder / "last.ckpt").exists() and not resuming_here:
            # A fresh run, or one resumed from another folder's checkpoint, would overwrite this run.
            raise UserError(f"{folder} already holds a run: resume it with --ckpt_path last, "
                            f"or start a new one with --run_name NAME (or delete {folder})")
        if sub == "fit" and (cfg.trainer.max_steps is None or cfg.trainer.max_steps <= 0):
            raise UserError(f"--trainer.max_steps must be a positive number of optimizer steps, got {cfg.trainer.max_steps} "
                            "(the learning rate decays over them)")
        self._resumed = saved if sub == "fit" else None  # its device and arithmetic are kept (instantiate_trainer)

    def _read_checkpoint(self, path: str) -> dict:
        """``read_checkpoint``, once per file and command."""
        key = str(Path(path).resolve())
        if key not in self._checkpoints:
            self._checkpoints[key] = read_checkpoint(path)
        return self._checkpoints[key]

    def _take_from_checkpoint(self, cfg, ckpt: dict, path: str) -> None:
        """The run's own settings from its checkpoint, over config files, under typed flags."""
        hparams = ckpt["hyper_parameters"]
        _, net_args = architecture(hparams["net"], path)

        def weights_fit(init_args: dict) -> bool:
            try:
                build_net({"class_path": hparams["net"]["class_path"], "init_args": init_args}, ckpt["state_dict"], path)
            except ConfigError:  # an impossible size, or weights the network refuses: its own line says why
                raise
            except UserError:
                return False
            return True

        chosen = settings.from_checkpoint(hparams, cfg.model.net.class_path.rsplit(".", 1)[-1], net_args,
                                          cfg.model.as_dict(), self._typed, weights_fit=weights_fit, source=path)
        for key, value in chosen.items():
            cfg[key] = value

    def _choose_device(self) -> dict:
        """The device when no --trainer.accelerator was given (gptnano/devices.py): a resumed run's
        own where this machine has it, else the CPU or the accelerator here, whichever trains this
        model faster by a measurement of a few real steps (remembered per machine and model
        shape); one line says which and why. The processes a DDP run starts from this one get
        the verdict through the environment, so every rank decides alike."""
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("accelerator", "auto") != "auto" or "trainer.accelerator" in self._typed:
            return {}  # the user's (an explicit "auto" too: Lightning's own rule)
        if handed := os.environ.get(devices.DEVICE_ENV):
            return {"accelerator": handed}
        resumed_on = ((self._resumed or {}).get("gptnano") or {}).get("device")
        one_device = trainer.get("devices", "auto") in ("auto", 1, "1") and trainer.get("num_nodes", 1) == 1
        net, batch_size = self.model.net, self.datamodule.batch_size
        work = {"command": "fit", "net": type(net).__name__, "batch": [batch_size, net.block_size],
                "parameters": [[n, list(p.shape)] for n, p in net.named_parameters()],
                "precision": trainer.get("precision"), "optimizer": self.model.hparams.optimizer,
                "muon_dtype": self.model.hparams.muon_dtype}
        choice = devices.choose(work, self._probe_step, batch_size * net.block_size, resumed_on=resumed_on,
                                one_device=one_device)
        if not choice.why:
            return {}  # nothing to choose between, nothing to say
        os.environ[devices.DEVICE_ENV] = choice.device
        if _rank_zero():
            print(devices.line(choice, "--trainer.accelerator"), file=sys.stderr)
        return {"accelerator": choice.device}

    def _probe_step(self, device: str):
        """One real training step of a copy of the run's network on ``device``, in the precision it
        would train in there (``gptnano.train.steps.training_step``), on a random batch of the
        run's shape: what the device choice times."""
        net, hp = copy.deepcopy(self.model.net), self.model.hparams
        precision = self._get(self.config_init, "trainer", default={}).get("precision")
        precision = precision or hardware.resolve_precision(device)[0]
        ns_dtype = hardware.fast_dtype(device) if hp.muon_dtype == "auto" else getattr(torch, hp.muon_dtype)
        ids = torch.randint(self.datamodule.vocab_size, (self.datamodule.batch_size, net.block_size + 1),
                            generator=torch.Generator().manual_seed(0))
        return training_step(net, {k: hp[k] for k in OPTIMIZER_SETTINGS}, device=device, precision=precision,
                             batch=(ids[:, :-1], ids[:, 1:]), ns_dtype=ns_dtype)

    def _choose_arithmetic(self, accelerator) -> dict:
        """The precision when none was given (gptnano.hardware.choose_precision), one line saying
        which and why; a resumed run also keeps the dtype its Muon orthogonalised in."""
        trainer = self._get(self.config_init, "trainer", default={})
        device = hardware.device_type(accelerator or trainer.get("accelerator", "auto"))
        kept = hardware.resumed_arithmetic(device, self._resumed)
        if kept.get("muon_dtype") and "model.muon_dtype" not in self._typed:
            self.model.hparams.muon_dtype = kept["muon_dtype"]  # read by configure_optimizers
        if device == "cpu":  # DDP processes started from this one decide alike, without measuring
            os.environ.setdefault(hardware.FAST_BF16_ENV, "1" if hardware.bf16_verdict("cpu").fast else "0")
        if trainer.get("precision") is not None:
            return {}  # the user's
        precision, why = hardware.choose_precision(device, kept)
        if _rank_zero():
            print(lines.line(f"precision {precision} ({why}); --trainer.precision overrides"), file=sys.stderr)
        return {"precision": precision}

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with checkpoints written atomically and read through the safe reader,
        a model summary without Lightning's column of zero FLOPs, and TF32 on CUDA."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a user's own writer wins
            plugins.append(AtomicCheckpointIO())
        kwargs.update(self._choose_device())
        kwargs.update(self._choose_arithmetic(kwargs.get("accelerator")))
        kwargs.update(self._intervals_in_optimizer_steps())
        kwargs.update(self._progress_as_lines())
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        quiet.drop_flops_column(trainer.callbacks)
        # fp32 matrix products on CUDA run as TF32 on tensor cores (Ampere and later: a 10-bit
        # mantissa, as nanoGPT trains). Chosen here on purpose, which also answers the hint Lightning
        # prints otherwise; CPU products stay exact fp32 (this flag is CUDA's only).
        torch.backends.cuda.matmul.allow_tf32 = True
        return trainer

    def _intervals_in_optimizer_steps(self) -> dict:
        """Trainer arguments that Lightning counts in batches, as gptnano counts everything: in
        optimizer steps. Under ``accumulate_grad_batches`` k, Lightning's integer
        ``val_check_interval`` n validates every n *batches* (steps 1, 3, 4, 6 for n=3, k=2):
        the Trainer gets n * k, so validation follows every n-th update. (``log_every_n_steps``,
        ``max_steps`` and gptnano's own ``last_every_n_steps`` already count updates; early stopping
        counts validations.) The saved config.yaml keeps the user's n."""
        trainer = self._get(self.config_init, "trainer", default={})
        k, n = trainer.get("accumulate_grad_batches") or 1, trainer.get("val_check_interval")
        if isinstance(k, int) and k > 1 and isinstance(n, int) and not isinstance(n, bool):
            return {"val_check_interval": n * k}
        return {}

    def _progress_as_lines(self) -> dict:
        """Where stdout (the progress bar's stream) is not a terminal, a progress bar would fill the
        file with carriage-return redraws: the Trainer gets gptnano's LogLines in its place
        (gptnano/train/progress.py). Not when the bar is off or a progress bar callback was given."""
        trainer = self._get(self.config_init, "trainer", default={})
        given = trainer.get("callbacks") or []
        given = list(given) if isinstance(given, list) else [given]
        if trainer.get("enable_progress_bar") is False or is_terminal(sys.stdout):
            return {}
        if any(isinstance(c, ProgressBar) for c in given):
            return {}
        return {"callbacks": [*given, LogLines()]}


def _rank_zero() -> bool:
    """Whether this process prints the run's lines (the first of its node and of the nodes)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def run(argv: list[str], verbose: bool = False) -> None:
    """Run one of Lightning's four commands (gptnano/cli/main.py sends them here)."""
    if not verbose:
        quiet.hide_noise()
    try:
        GPTNanoCLI(args=argv)
    except SIGTERMException:
        print("gptnano: interrupted; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(130 if CTRL_C.is_set() else 143)  # as a shell reports SIGINT and SIGTERM
