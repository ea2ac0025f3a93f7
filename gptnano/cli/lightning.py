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
import threading
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptnano import devices, hardware, lines
from gptnano.checkpoint import architecture, build_net, load_grown, read_checkpoint, run_name
from gptnano.cli import quiet, settings
from gptnano.cli.commands import TOOLS
from gptnano.data.datamodule import ShakespeareDataModule
from gptnano.errors import ConfigError, UserError
from gptnano.files import check_writable_folder, os_error_in, write_error
from gptnano.train.callbacks import EarlyStopping, PredictionWriter, TextSample, Throughput
from gptnano.train.checkpointing import CTRL_C, AtomicCheckpointIO, Checkpoint
from gptnano.train.guard import NonFiniteGuard
from gptnano.train.logger import RunSettings
from gptnano.train.module import LitLM
from gptnano.train.progress import LogLines, is_terminal
from gptnano.train.report import RunReport
from gptnano.train.steps import OPTIMIZER_SETTINGS, training_step

_MODEL_ARGS = set(inspect.signature(LitLM.__init__).parameters) - {"self"}
_OUTPUTS: list[str] = []  # the folders this command writes to, for a write error that names no file


def subcommand_parser(parser, name: str):
    """The parser of one subcommand (jsonargparse keeps them in a private map; tests/test_dependencies.py
    fails loudly if that changes)."""
    return parser._subcommands_action._name_parser_map[name]


class Parser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        # The full usage runs to a hundred lines and buries the error under it.
        (file or sys.stdout).write(f"usage: {self.prog} [options]\n")


def _rank_zero() -> bool:
    """Whether this is the process that speaks (the first of a node's ranks, on the first node)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _step_of(saved: dict | None) -> int:
    """The optimizer step a checkpoint's weights had: a file's global_step, an export's recorded one."""
    if not saved:
        return 0
    step = saved.get("global_step", (saved.get("exported_from") or {}).get("global_step"))
    return int(step) if isinstance(step, int) else 0


def _home(source: str) -> Path:
    """The folder a trained model lives in: an exported folder itself, a checkpoint file's run folder."""
    path = Path(source).resolve()
    return path if path.is_dir() else path.parent


class GPTNanoCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        self._checkpoints = {}  # path -> checkpoint: read once, though parsing and building both need it
        self._init_source = None  # (path, checkpoint) of fit --init_from, whose weights the new network takes
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
                "callbacks": [RunReport(), LearningRateMonitor("step"), Throughput(), TextSample(), PredictionWriter(),
                              RunSettings(), NonFiniteGuard()],
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
        parser.add_argument("--init_from", type=str | None, default=None,
                            help="fit only: start a new run from a trained model, a checkpoint file or a folder "
                                 "written by `gptnano export`: its network, sizes and weights, with a fresh "
                                 "optimizer and schedule from step 0 and this command's other settings (learning "
                                 "rates, dropout, sampling, text). Characters of the text the model has never seen "
                                 "get new rows in the embedding and output head. The run is named <source run>-ft "
                                 "unless --run_name says otherwise; resume it with --run_name and --ckpt_path last.")
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
        if why := settings.missing_checkpoint(cmd):
            raise UserError(why)  # before the parser asks for a --model.net the checkpoint would have given
        ckpt = settings.checkpoint_named(cmd)
        if cmd.subcommand and ckpt:
            # As defaults, so that `predict --ckpt_path X` needs no --config or --model.net;
            # before_instantiate_classes then makes the checkpoint win over config files too.
            defaults = settings.parser_defaults(self._read_checkpoint(ckpt)["hyper_parameters"], _MODEL_ARGS)
            subcommand_parser(parser, cmd.subcommand).set_defaults(defaults)
        elif source := cmd.init_from:
            self._check_fit(cmd.subcommand)
            # (No subcommand: the CLI built in Python with run=False, whose classes are a fit's.)
            target = subcommand_parser(parser, cmd.subcommand) if cmd.subcommand else parser
            target.set_defaults(self._source_defaults(source))
        self.config = parser.parse_args(argv)

    def _parse_ckpt_path(self) -> None:
        """Replaced by ``parse_arguments`` above: Lightning's version lets the
        checkpoint override what the user typed (``--model.max_new_tokens``)."""

    # ----- run folders and --ckpt_path last/best ----------------------------
    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        if sub == "fit":
            settings.check_trainer(cfg.trainer.as_dict())
            settings.check_callbacks(cfg.checkpoint.as_dict(), cfg.early_stopping.as_dict())
        if cfg.get("init_from"):
            self._start_from(sub, cfg)
        ckpt = cfg.get("ckpt_path")
        if ckpt and sub == "fit" and Path(ckpt).is_dir():
            raise UserError(f"--ckpt_path {ckpt} is an exported model, which holds no training state to resume: "
                            f"start a new run from it with --init_from {ckpt}")
        saved = self._read_checkpoint(ckpt) if ckpt and ckpt not in ("last", "best") else None
        if saved is not None:
            self._take_run_settings(cfg, saved, ckpt, sub)  # the run's name among them: it places the run
        name = cfg.run_name or cfg.model.net.class_path.rsplit(".", 1)[-1].lower()
        cfg.run_name = name
        if "run_name" in self._typed and "checkpoint.dirpath" not in self._typed:
            cfg.checkpoint.dirpath = None  # a typed run name moves the run, whatever a saved config.yaml pinned
        folder = Path(cfg.checkpoint.dirpath or Path("checkpoints") / name)
        cfg.checkpoint.dirpath = str(folder)
        if ckpt in ("last", "best"):
            path = folder / f"{ckpt}.ckpt"
            if not path.is_file():
                action = "resume" if sub == "fit" else sub
                raise UserError(f"--ckpt_path {ckpt}: no {path} to {action} from (train first, or pass a checkpoint file)")
            cfg.ckpt_path = ckpt = str(path)
            saved = self._read_checkpoint(ckpt)
            self._take_run_settings(cfg, saved, ckpt, sub)
            cfg.run_name = name  # the run found by its name stays that run
        if saved is not None:
            self._take_from_checkpoint(cfg, saved, ckpt)
        self._place_logs(cfg, sub, name, saved)
        if sub == "predict":
            cfg.trainer.enable_progress_bar = False  # stdout carries the generated text and nothing else
        resuming_here = bool(ckpt) and Path(ckpt).resolve().parent == folder.resolve()
        if self._init_source and folder.resolve() == _home(self._init_source[0]):
            raise UserError(f"--init_from {self._init_source[0]}: the new run needs a folder of its own, not "
                            f"the source's {folder}: give another --run_name")
        if sub == "fit" and settings.holds_a_run(folder) and not resuming_here:
            # A fresh run, or one resumed from another folder's checkpoint, would overwrite this run.
            how = " (without --init_from)" if self._init_source else ""
            raise UserError(f"{folder} already holds a run: resume it with --ckpt_path last{how}, "
                            f"or start a new one with --run_name NAME (or delete {folder})")
        self._resumed = saved if sub == "fit" else None  # its device and arithmetic are kept (instantiate_trainer)

    def _place_logs(self, cfg, sub: str | None, name: str, saved: dict | None) -> None:
        """TensorBoard logs in one folder per run: ``<logs>/<run>/version_N`` for training,
        ``<logs>/<run>/eval/version_N`` for validate, test and predict, at the step of the
        checkpoint they read, apart from the training curves (``gptnano plot`` reads those only).
        ``<logs>`` is ``lightning_logs``, or the Board's ``save_dir`` where one was given."""
        board = getattr(cfg.trainer.logger, "class_path", None) == "gptnano.train.logger.Board"
        if cfg.trainer.logger not in (None, True) and not board:
            return  # a logger of the user's own: theirs to place
        root = (cfg.trainer.logger.init_args.get("save_dir") if board else None) or "lightning_logs"
        if sub in ("validate", "test", "predict"):
            init = {"save_dir": str(Path(root) / name), "name": "eval", "step": _step_of(saved)}
        else:
            init = {"save_dir": root, "name": name}  # a saved config.yaml's old run name follows the run
        if not board:
            cfg.trainer.logger = Namespace(class_path="gptnano.train.logger.Board", init_args=Namespace(**init))
            return
        for key, value in init.items():
            cfg.trainer.logger.init_args[key] = value

    def _take_run_settings(self, cfg, saved: dict, path: str, sub: str | None) -> None:
        """The run's settings a checkpoint keeps beyond the model's (its name, seed, data settings,
        early stopping's patience): the checkpoint's unless typed; a typed one that a resume cannot
        take is refused (gptnano/cli/settings.py, ``on_resume``)."""
        found = settings.saved_settings(saved)
        asked = {key: cfg.get(key) for key in found}
        asked.update({key: cfg.get(key) for key in settings.ALWAYS_THE_CHECKPOINT_S})
        found.update({f"data.{k}": v for k, v in settings.data_from(saved["hyper_parameters"]).items()})
        chosen = settings.on_resume(found, asked, self._typed, fitting=sub == "fit", source=path)
        if "checkpoint.dirpath" in self._typed:
            chosen.pop("run_name", None)
        if sub != "fit":
            chosen.pop("early_stopping.patience", None)
        seed = chosen.get("seed_everything")
        if seed is not None and seed != cfg.get("seed_everything"):
            from lightning.pytorch import seed_everything

            seed_everything(seed, workers=True)  # the run's seed: a resume draws on as the run would have
        for key, value in chosen.items():
            if key in ("data.vocab", "data.tokenizer"):
                continue  # _take_from_checkpoint sets the tokenizer
            cfg[key] = value

    # ----- fit --init_from: a new run that starts from a trained model's weights --------------
    def _source_defaults(self, path: str) -> dict:
        """Parser defaults from a trained model, so that ``fit --init_from X`` needs no --config:
        its architecture with the sizes its weights fix (the rest is a new run's), and its tokenizer."""
        hparams = self._read_checkpoint(path)["hyper_parameters"]
        cls, init_args = architecture(hparams["net"], path)
        fixed = {k: v for k, v in init_args.items() if k not in cls.run_settings}
        return {"model.net": {"class_path": hparams["net"]["class_path"], "init_args": fixed},
                "data.tokenizer": hparams.get("tokenizer", "char")}

    @staticmethod
    def _check_fit(sub: str | None) -> None:
        if sub not in ("fit", None):
            raise UserError(f"--init_from is for fit; {sub} takes a checkpoint or an exported folder as --ckpt_path")

    def _start_from(self, sub: str | None, cfg) -> None:
        """Set up ``fit --init_from PATH``: the network and its sizes from PATH (a size typed
        otherwise on the command line is one line), its tokenizer with the text's new characters
        appended, the run's name; the weights are copied in once the network is built
        (``instantiate_classes``). Everything else is a new run's, from the config and flags."""
        source = cfg.init_from
        self._check_fit(sub)
        if cfg.get("ckpt_path"):
            if "init_from" in self._typed:
                raise UserError("--init_from starts a new run from a trained model, --ckpt_path resumes a run: give "
                                "one of them (a run begun with --init_from resumes with --run_name NAME --ckpt_path last)")
            cfg.init_from = None  # from the saved config.yaml of a run begun with --init_from, now resumed
            return
        ckpt = self._read_checkpoint(source)
        hparams = ckpt["hyper_parameters"]
        cls, init_args = architecture(hparams["net"], source)
        net = cfg.model.net
        asked = net.class_path.rsplit(".", 1)[-1]
        if asked != cls.__name__:
            raise UserError(f"--init_from {source} holds a {cls.__name__} network, but --config or --model.net ask "
                            f"for {asked}: give the {cls.__name__}'s config, or none")
        # An argument the checkpoint does not name came into gptnano after it, with a default that
        # computes what the network did then (a new GPT option: off): the weights fix it too.
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if k != "self" and p.default is not inspect.Parameter.empty}
        fixed = {k: v for k, v in {**defaults, **init_args}.items() if k not in cls.run_settings and k != "vocab_size"}
        typed = {k: net.init_args.get(k) for k in fixed
                 if f"model.net.{k}" in self._typed and net.init_args.get(k) != fixed[k]}
        if typed:
            shown = ", ".join(f"{k}={v} (its weights: {fixed[k]})" for k, v in typed.items())
            raise UserError(f"--init_from {source} cannot take {shown}: the network and its sizes come from the "
                            "trained model (train one of other sizes without --init_from)")
        for key, value in fixed.items():
            net.init_args[key] = value
        kind = hparams.get("tokenizer", "char")
        if ("data.tokenizer" in self._typed and cfg.data.tokenizer != kind) or "data.vocab" in self._typed:
            raise UserError(f"--init_from {source}: the tokenizer is the trained model's ({kind}), "
                            "with the text's new characters appended: leave out --data.tokenizer and --data.vocab")
        cfg.data.tokenizer = kind
        cfg.data.vocab = self._grown_vocabulary(cfg, hparams["vocab"]) if kind == "char" else None
        cfg.run_name = cfg.run_name or f"{run_name(source, ckpt)}-ft"
        self._init_source = (source, ckpt)

    def _grown_vocabulary(self, cfg, old: str) -> str:
        """The trained model's vocabulary in its own order, then the characters of the text it has
        never seen (sorted): old ids keep their meaning, new ones come after them."""
        text = ShakespeareDataModule(**{**cfg.data.as_dict(), "vocab": None}).vocab  # the text's characters
        new = "".join(c for c in text if c not in old)
        if new and _rank_zero():
            print(f"gptnano: {len(new)} characters of the text are new to the model ({new!r}): they get new rows "
                  "in the embedding and output head, after its own", file=sys.stderr)
        return old + new

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._init_source:
            # The network was just built fresh (seeded) for the new vocabulary: the trained weights
            # replace its own, except the rows of new characters, which stay as a fresh model has them.
            source, ckpt = self._init_source
            load_grown(self.model.net, ckpt["state_dict"], source)
            if _rank_zero():
                step = ckpt.get("global_step", ckpt.get("exported_from", {}).get("global_step"))
                print(f"gptnano: starting from {source}" + (f" (step {step})" if step is not None else "") +
                      ": a new run from step 0, optimizer and schedule fresh", file=sys.stderr)

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
            except ConfigError:  # an impossible size: its own line says why
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
        work = devices.work_of("fit", net, batch=[batch_size, net.block_size], precision=trainer.get("precision"),
                               optimizer=self.model.hparams.optimizer, muon_dtype=self.model.hparams.muon_dtype)
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

    # ----- before the first step: can the run's outputs be written? ----------
    def _check_outputs(self) -> None:
        """A folder the run cannot write (read-only, no permission, a file in the way) is refused in
        one line before any data is prepared or any step taken, not after minutes of training.
        Nothing is created here: a user mistake found later leaves no folder behind."""
        if self.trainer.global_rank != 0:
            return
        callback, logger = self.trainer.checkpoint_callback, self.trainer.logger
        if self.subcommand == "fit" and callback is not None and callback.dirpath:
            _OUTPUTS.append(os.path.relpath(callback.dirpath))
            check_writable_folder(callback.dirpath, "checkpoints", create=False)
        if logger is not None and logger.save_dir:
            _OUTPUTS.append(str(Path(logger.save_dir) / str(logger.name)))
            check_writable_folder(_OUTPUTS[-1], "logs", create=False)

    def before_fit(self) -> None:
        self._check_outputs()

    def before_validate(self) -> None:
        self._check_outputs()

    def before_test(self) -> None:
        self._check_outputs()

    def before_predict(self) -> None:
        self._check_outputs()

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
        kwargs.update(self._progress_and_summary())
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

    def _progress_and_summary(self) -> dict:
        """The progress bar and the model summary, the same wherever gptnano runs.

        Where stdout (the progress bar's stream) is not a terminal, a progress bar would fill the
        file with carriage-return redraws: the Trainer gets gptnano's LogLines in its place
        (gptnano/train/progress.py). On a terminal it gets Lightning's tqdm bar, and a plain
        ModelSummary: Lightning would swap both for Rich ones whenever the ``rich`` package
        happens to be installed (many tools pull it in), changing gptnano's output and its
        hidden messages (gptnano/cli/quiet.py) with it. Not when the bar or the summary is off,
        or a callback of that kind was given (a user's RichProgressBar wins)."""
        trainer = self._get(self.config_init, "trainer", default={})
        given = trainer.get("callbacks") or []
        given = list(given) if isinstance(given, list) else [given]
        added = []
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            added.append(TQDMProgressBar() if is_terminal(sys.stdout) else LogLines())
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
            added.append(ModelSummary())
        return {"callbacks": [*given, *added]} if added else {}

def run(argv: list[str], verbose: bool = False) -> None:
    """Run one of Lightning's four commands (gptnano/cli/main.py sends them here).

    A write the OS refused anywhere below (a checkpoint, TensorBoard's event files, hparams.yaml,
    config.yaml, predictions), however a library wrapped it, ends as one ``WriteError`` line."""
    if not verbose:
        quiet.hide_noise()
    _OUTPUTS.clear()
    previous_hook = threading.excepthook

    def refused_writes_once(args) -> None:
        # TensorBoard writes in a thread and raises the thread's error again in the main one, where it
        # becomes the one WriteError line: the thread's own traceback would only print it twice.
        if os_error_in(args.exc_value) is None:
            previous_hook(args)

    threading.excepthook = refused_writes_once
    try:
        GPTNanoCLI(args=argv)
    except SIGTERMException:
        sys.exit(130 if CTRL_C.is_set() else 143)  # as a shell reports SIGINT and SIGTERM; on_exception said where
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        refused = os_error_in(e)
        if refused is None:
            raise
        where = refused.filename or (f"a file in {' or '.join(_OUTPUTS)}" if _OUTPUTS else "a file of the run")
        raise write_error(where, refused,
                          "checkpoints and logs written before it are intact (a checkpoint is written "
                          "whole or not at all)") from None
    finally:
        threading.excepthook = previous_hook
