"""Lightning's four `gptnano` commands (fit, validate, test, predict; gptnano/cli/main.py
sends them here): LightningCLI with the defaults a user of this tool expects.

What it adds to LightningCLI: a folder per run (``<default_root_dir>/checkpoints/<run_name>/``,
logs in ``lightning_logs/<run_name>/``) so ``--ckpt_path last`` and ``best`` work from a new
process; the config a checkpoint keeps as the parser's base for every command that starts
from it, the command line applying over it (gptnano/cli/settings.py); the device and the
precision chosen for the machine when none is given (gptnano/devices.py); gptnano's callbacks
and TensorBoard logger beside the user's own; steps that count optimizer updates under
gradient accumulation; progress as plain lines when the output is a file; and one-line errors
instead of tracebacks for mistakes a user can fix.
"""

import contextlib
import copy
import io
import logging
import os
import sys
import threading
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptnano import devices, hardware, lines
from gptnano.checkpoint import architecture, fixed_args, load_grown, read_checkpoint, run_config, run_name
from gptnano.cli import quiet, settings
from gptnano.cli.commands import TOOLS
from gptnano.data.cache import run_text
from gptnano.data.datamodule import DEFAULT_CACHE, SHAKESPEARE_SHA256, ShakespeareDataModule, check_splits
from gptnano.errors import UserError
from gptnano.files import check_writable_folder, os_error_in, write_error
from gptnano.train.callbacks import PredictionWriter, ResumableEarlyStopping, TextSample, Throughput
from gptnano.train.checkpointing import STOP, AtomicCheckpointIO, Checkpoint, stop_exit_status
from gptnano.train.guard import NonFiniteGuard
from gptnano.train.logger import RunSettings
from gptnano.train.module import LitLM
from gptnano.train.progress import LogLines, is_terminal
from gptnano.train.record import RunConfig, dump_config
from gptnano.train.report import RunReport
from gptnano.train.steps import OPTIMIZER_SETTINGS, training_step

_OUTPUTS: list[str] = []  # the folders this command writes to, for a write error that names no file


class Parser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        # The full usage runs to a hundred lines and buries the error under it.
        (file or sys.stdout).write(f"usage: {self.prog} [options]\n")


def _rank_zero() -> bool:
    """Whether this is the process that speaks (the first of a node's ranks, on the first node)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _step_of(saved: dict | None) -> int:
    """The optimizer step a checkpoint's weights had: a file's global_step, an export's recorded one."""
    step = (saved or {}).get("global_step", ((saved or {}).get("exported_from") or {}).get("global_step"))
    return int(step) if isinstance(step, int) else 0


class _Resolved(Exception):
    """How ``GPTNanoCLI(resolve_only=True)`` hands its resolved config out before building anything."""

    def __init__(self, config: dict):
        super().__init__("resolved")
        self.config = config


class GPTNanoCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, resolve_only: bool = False):
        self._resolve_only = resolve_only  # stop once the config is resolved (``resolved_config``)
        self._saved = None  # the checkpoint --ckpt_path or --init_from names, read once
        self._ckpt_path = None  # the file --ckpt_path names, out of the config until the classes are built
        self._typed: set[str] = set()
        super().__init__(
            LitLM,
            ShakespeareDataModule,
            seed_everything_default=1337,
            save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},  # RunConfig places it
            auto_configure_optimizers=False,  # LitLM.configure_optimizers owns Muon/AdamW + schedule
            trainer_defaults={"gradient_clip_val": 1.0, "max_steps": 2000, "val_check_interval": 250,
                              "check_val_every_n_epoch": None},
            parser_class=Parser,
            parser_kwargs={"prog": "gptnano", "description": "Train and sample small language models written from "
                           "scratch. Also: " + "; ".join(f"gptnano {k}: {v}" for k, (_, v) in TOOLS.items()) + "."},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Name of the run: checkpoints go to checkpoints/<run_name>/ and logs to "
                                 "lightning_logs/<run_name>/, under --trainer.default_root_dir (default: the "
                                 "architecture's name, e.g. gpt).")
        parser.add_argument("--init_from", type=str | None, default=None,
                            help="fit only: start a new run from a trained model, a checkpoint file or a folder "
                                 "written by `gptnano export`: its network, sizes and weights, with a fresh "
                                 "optimizer and schedule from step 0 and this command's other settings (learning "
                                 "rates, dropout, sampling, text). Characters of the text the model has never seen "
                                 "get new rows in the embedding and output head. The run is named <source run>-ft "
                                 "unless --run_name says otherwise; resume it with --run_name and --ckpt_path last.")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.filename": "best",
                             "checkpoint.save_top_k": 1, "checkpoint.save_last": True})
        parser.add_lightning_class_args(ResumableEarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/loss", "early_stopping.patience": 10})
        parser.link_arguments("data.vocab_size", "model.net.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.tokenizer_kind", "model.tokenizer", apply_on="instantiate")

    # ----- a checkpoint's config is the base, the command line applies over it ----------------
    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict):
            return super().parse_arguments(parser, args)
        argv = settings.moved_class_paths(settings.architecture_names(sys.argv[1:] if args is None else list(args)))
        cmd = settings.read_command_line(argv, self.subcommands())
        self._typed = cmd.typed
        if cmd.init_from and cmd.subcommand not in ("fit", None):
            raise UserError(f"--init_from is for fit; {cmd.subcommand} takes a checkpoint or an exported folder as "
                            "--ckpt_path")
        if cmd.init_from and cmd.ckpt_path:
            raise UserError("--init_from starts a new run from a trained model, --ckpt_path resumes a run: give one of "
                            "them (a run begun with --init_from resumes with --run_name NAME --ckpt_path last)")
        if cmd.ckpt_path:
            path = cmd.ckpt_path
            if path in ("last", "best"):
                found = cmd.configs or "model.net" in cmd.typed
                folder = settings.run_folder(cmd.run_name, cmd.dirpath, cmd.root) if cmd.run_name or cmd.dirpath \
                    else self._folder_from(parser, argv) if found else None
                path = settings.named_file(cmd.ckpt_path, folder, cmd.subcommand)
            self._saved, self._ckpt_path = read_checkpoint(path), path
            argv = settings.with_base(argv, cmd.subcommand, settings.without(run_config(self._saved)))
        elif cmd.init_from:
            self._saved = read_checkpoint(cmd.init_from)
            cls, init_args = architecture(self._saved["hyper_parameters"]["net"], cmd.init_from)
            net = {"class_path": self._saved["hyper_parameters"]["net"]["class_path"],
                   "init_args": fixed_args(cls, init_args)}
            argv = settings.with_base(argv, cmd.subcommand, {"model": {"net": net}})
        self.config = parser.parse_args(argv)
        # Lightning 2.6 re-applies a checkpoint's hyper-parameters over the parsed config right after
        # parsing (LightningCLI._parse_ckpt_path), so a typed --model.learning_rate would come back as the
        # checkpoint's: ckpt_path stays out of the config until the classes are built.
        if "ckpt_path" in self._cfg():
            self._cfg().ckpt_path = None

    def _cfg(self):
        sub = self.config.get("subcommand")
        return self.config[sub] if sub else self.config

    def _folder_from(self, parser, argv: list[str]) -> Path | None:
        """The run folder the config files and flags name, parsed once without a checkpoint."""
        probe = parser.parse_args([a for a in argv if not a.startswith("--print_config")])
        cfg = probe[probe.subcommand] if probe.get("subcommand") else probe
        name = cfg.run_name or cfg.model.net.class_path.rsplit(".", 1)[-1].lower()
        return settings.run_folder(name, cfg.checkpoint.dirpath, cfg.trainer.default_root_dir)

    # ----- the run: its settings checked, its folder, its logs ----------------------------------
    def before_instantiate_classes(self) -> None:
        sub, cfg = self.config.get("subcommand"), self._cfg()
        for key, value in settings.check_trainer(cfg.trainer.as_dict(), self._typed).items():
            cfg.trainer[key] = value
        settings.check_callbacks(cfg.as_dict())
        given = cfg.trainer.callbacks
        if isinstance(given, list):  # `--trainer.callbacks+=X` on a resume of a run that has X: one X
            cfg.trainer.callbacks = [c for i, c in enumerate(given) if c not in given[:i]]
        if self._ckpt_path:
            self._from_checkpoint(cfg, sub)
        elif self._saved is not None:
            self._start_from(cfg)
        name = cfg.run_name = cfg.run_name or cfg.model.net.class_path.rsplit(".", 1)[-1].lower()
        root = cfg.trainer.default_root_dir
        dirpath = cfg.checkpoint.dirpath if "checkpoint.dirpath" in self._typed or not (
            self._saved or "run_name" in self._typed) else None
        folder = settings.run_folder(name, dirpath, root)
        cfg.checkpoint.dirpath = str(folder)
        self._place_logs(cfg, sub, name, root)
        if sub == "predict":
            cfg.trainer.enable_progress_bar = False  # stdout carries the generated text and nothing else
        if sub == "fit" and not self._resolve_only:  # a comparison asks about folders that hold its runs
            self._check_run_folder(cfg, folder)
        if "ckpt_path" in cfg:
            cfg.ckpt_path = self._ckpt_path
        if self._resolve_only:
            plain = yaml.safe_load(dump_config(self.parser, self.config))
            raise _Resolved(plain[sub] if sub else plain)

    def _from_checkpoint(self, cfg, sub: str | None) -> None:
        """Refuse what a command starting from this checkpoint may not change, and find its text."""
        path, saved = self._ckpt_path, self._saved
        if sub == "fit" and Path(path).is_dir():
            raise UserError(f"--ckpt_path {path} is an exported model, which holds no training state to resume: "
                            f"start a new run from it with --init_from {path}")
        base = run_config(saved)
        cls, net_args = architecture(saved["hyper_parameters"]["net"], path)
        fixed = fixed_args(cls, net_args)
        base["model"]["net"]["init_args"] = {**fixed, **base["model"]["net"].get("init_args", {})}
        if cfg.model.net.class_path.rsplit(".", 1)[-1] == cls.__name__:
            for key in set(fixed) - {k.removeprefix("model.net.") for k in self._typed}:
                cfg.model.net.init_args[key] = fixed[key]  # the weights fix it: over a --config file, not a flag
        settings.refusals(base, cfg.as_dict(), fitting=sub == "fit", fixed=set(fixed), source=path)
        was = base["data"].get("batch_size")
        if sub == "fit" and was and was != cfg.data.batch_size and _rank_zero():
            print(f"gptnano: batch size {was} -> {cfg.data.batch_size} from step {_step_of(saved)}: the batches differ "
                  "from an unbroken run's from here on, and an epoch in progress ends at the new length",
                  file=sys.stderr)
        text = (saved.get("gptnano") or {}).get("text")
        if sub != "predict" and text:  # (an older checkpoint recorded no text: it reads the one given)
            asked = cfg.data.path if cfg.data.path != base["data"].get("path") or "data.path" in self._typed else None
            cfg.data.path, line = run_text(text, asked, cfg.data.tokenizer, DEFAULT_CACHE, SHAKESPEARE_SHA256)
            if line and _rank_zero():
                print(line, file=sys.stderr)
        if sub in ("validate", "test") and text and text["path"] == cfg.data.path:
            check_splits(base["data"], cfg.data.as_dict(), sub)

    def _start_from(self, cfg) -> None:
        """``fit --init_from PATH``: the network and its sizes from PATH (a size typed otherwise is one
        line), its tokenizer with the text's new characters appended, the run's name; the weights are
        copied in once the network is built (``instantiate_classes``)."""
        source, hparams = cfg.init_from, self._saved["hyper_parameters"]
        cls, init_args = architecture(hparams["net"], source)
        net = cfg.model.net
        if net.class_path.rsplit(".", 1)[-1] != cls.__name__:
            raise UserError(f"--init_from {source} holds a {cls.__name__} network, but --config or --model.net ask "
                            f"for {net.class_path.rsplit('.', 1)[-1]}: give the {cls.__name__}'s config, or none")
        fixed = fixed_args(cls, init_args)
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
        cfg.run_name = cfg.run_name or f"{run_name(source, self._saved)}-ft"

    def _grown_vocabulary(self, cfg, old: str) -> str:
        """The trained model's vocabulary in its own order, then the characters of the text it has
        never seen (sorted): old ids keep their meaning, new ones come after them."""
        text = ShakespeareDataModule(**{**cfg.data.as_dict(), "vocab": None}).vocab  # the text's characters
        new = "".join(c for c in text if c not in old)
        if new and _rank_zero():
            print(f"gptnano: {len(new)} characters of the text are new to the model ({new!r}): they get new rows "
                  "in the embedding and output head, after its own", file=sys.stderr)
        return old + new

    def _check_run_folder(self, cfg, folder: Path) -> None:
        """A fit never overwrites another run, nor rewinds its own last.ckpt."""
        ckpt = self._ckpt_path
        here = bool(ckpt) and Path(ckpt).resolve().parent == folder.resolve()
        if cfg.get("init_from") and folder.resolve() in (Path(cfg.init_from).resolve(),
                                                          Path(cfg.init_from).resolve().parent):
            raise UserError(f"--init_from {cfg.init_from}: the new run needs a folder of its own, not the "
                            f"source's {folder}: give another --run_name")
        if settings.holds_a_run(folder) and not here and not cfg.trainer.fast_dev_run:
            how = " (without --init_from)" if cfg.get("init_from") else ""
            raise UserError(f"{folder} already holds a run: resume it with --ckpt_path last{how}, "
                            f"or start a new one with --run_name NAME (or delete {folder})")
        last = folder / "last.ckpt"
        if here and Path(ckpt).name != last.name and last.is_file():
            at, behind = _step_of(self._saved), _step_of(torch.load(last, weights_only=True, mmap=True))
            if at < behind:
                raise UserError(f"--ckpt_path {ckpt} is at step {at}, but {last} is at step {behind}: resuming it here "
                                f"would rewind the run and lose steps {at + 1}-{behind}; resume with --ckpt_path "
                                "last, or train on from it as a new run with --run_name NAME")

    def _place_logs(self, cfg, sub: str | None, name: str, root: str | None) -> None:
        """gptnano's TensorBoard logger (Board) in the run's folder: ``<logs>/<run>/version_N`` for
        training, ``<logs>/<run>/eval/version_N`` for validate, test and predict, at the step of the
        checkpoint they read; ``<logs>`` is ``<root>/lightning_logs``, or the Board's ``save_dir`` where one
        was typed. A logger the user gives alone replaces it, as in Lightning; a list keeps it beside
        theirs; ``--trainer.logger false`` trains without any."""
        logger, board_class = cfg.trainer.logger, "gptnano.train.logger.Board"
        boards = [x for x in (logger if isinstance(logger, list) else [logger])
                  if getattr(x, "class_path", None) == board_class]
        typed = boards and boards[0].init_args.get("save_dir") and {"trainer.logger", "trainer.logger.save_dir"} & \
            self._typed
        logs = Path(boards[0].init_args.save_dir) if typed else Path(root or ".") / "lightning_logs"
        evaluating = sub in ("validate", "test", "predict")
        init = {"save_dir": str(logs / name), "name": "eval", "step": _step_of(self._saved)} if evaluating \
            else {"save_dir": str(logs), "name": name}
        if logger in (None, True):
            cfg.trainer.logger = Namespace(class_path=board_class, init_args=Namespace())
            boards = [cfg.trainer.logger]
        elif isinstance(logger, list) and not boards:
            boards = [Namespace(class_path=board_class, init_args=Namespace())]
            logger.append(boards[0])
        for found in boards:
            for key, value in init.items():
                found.init_args[key] = value

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._saved is not None and not self._ckpt_path:
            # fit --init_from: the network was just built fresh (seeded) for the new vocabulary; the trained
            # weights replace its own, except the rows of new characters, which stay as a fresh model has them.
            source = self._cfg().init_from
            load_grown(self.model.net, self._saved["state_dict"], source)
            if _rank_zero():
                step = _step_of(self._saved)
                print(f"gptnano: starting from {source} (step {step}): a new run from step 0, optimizer and "
                      "schedule fresh", file=sys.stderr)

    # ----- the machine: device and arithmetic, chosen when not given -------------------------
    def _trainer_cfg(self) -> dict:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return config.get("trainer") or {}

    def _choose_device(self) -> dict:
        """The device when no --trainer.accelerator was given (gptnano/devices.py): a resumed run's
        own where this machine has it, else the CPU or the accelerator here, whichever trains this
        model faster by a measurement of a few real steps; one line says which and why. DDP processes
        started from this one get the verdict through the environment, so every rank decides alike."""
        trainer = self._trainer_cfg()
        if trainer.get("accelerator", "auto") != "auto" or "trainer.accelerator" in self._typed:
            return {}  # the user's (an explicit "auto" too: Lightning's own rule)
        if handed := os.environ.get(devices.DEVICE_ENV):
            return {"accelerator": handed}
        resumed_on = self._resumed().get("device")
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

    def _resumed(self) -> dict:
        """The facts of the run a fit resumes (its device, precision, Muon's dtype), else nothing."""
        return (self._saved or {}).get("gptnano") or {} if self._ckpt_path and self.subcommand == "fit" else {}

    def _probe_step(self, device: str):
        """One real training step of a copy of the run's network on ``device``, in the precision it
        would train in there, on a random batch of the run's shape: what the device choice times."""
        net, hp = copy.deepcopy(self.model.net), self.model.hparams
        precision = self._trainer_cfg().get("precision") or hardware.resolve_precision(device)[0]
        ns_dtype = hardware.fast_dtype(device) if hp.muon_dtype == "auto" else getattr(torch, hp.muon_dtype)
        ids = torch.randint(self.datamodule.vocab_size, (self.datamodule.batch_size, net.block_size + 1),
                            generator=torch.Generator().manual_seed(0))
        return training_step(net, {k: hp[k] for k in OPTIMIZER_SETTINGS}, device=device, precision=precision,
                             batch=(ids[:, :-1], ids[:, 1:]), ns_dtype=ns_dtype)

    def _choose_arithmetic(self, accelerator) -> dict:
        """The precision when none was given (gptnano.hardware.choose_precision), one line saying
        which and why; a resumed run also keeps the dtype its Muon orthogonalised in."""
        trainer = self._trainer_cfg()
        device = hardware.device_type(accelerator or trainer.get("accelerator", "auto"))
        kept = hardware.resumed_arithmetic(device, {"gptnano": self._resumed()})
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

    # ----- the Trainer ---------------------------------------------------------------------------
    def instantiate_trainer(self, **kwargs):
        """The Trainer with gptnano's callbacks beside the user's, checkpoints written atomically and
        read through the safe reader, and TF32 on CUDA. A setting Lightning refuses is one line."""
        trainer = self._trainer_cfg()
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a user's own writer wins
            plugins.append(AtomicCheckpointIO())
        kwargs.update(self._choose_device())
        kwargs.update(self._choose_arithmetic(kwargs.get("accelerator")))
        kwargs.update(self._intervals_in_optimizer_steps(trainer))
        kwargs["callbacks"] = self._callbacks(trainer)
        if trainer.get("enable_checkpointing") is False:  # Lightning would refuse gptnano's Checkpoint: it saves nothing
            kwargs["enable_checkpointing"] = True
            self._cfg_init("checkpoint").turn_off()
        try:
            built = super().instantiate_trainer(plugins=plugins, **kwargs)
        except MisconfigurationException as e:
            raise UserError(str(e).strip().splitlines()[0]) from None
        quiet.drop_flops_column(built.callbacks)
        # fp32 matrix products on CUDA run as TF32 on tensor cores (Ampere and later, as nanoGPT trains);
        # CPU products stay exact fp32 (this flag is CUDA's only).
        torch.backends.cuda.matmul.allow_tf32 = True
        return built

    def _cfg_init(self, key: str):
        return (self.config_init[self.subcommand] if self.subcommand else self.config_init)[key]

    def _intervals_in_optimizer_steps(self, trainer: dict) -> dict:
        """Under ``accumulate_grad_batches`` k, Lightning's integer ``val_check_interval`` n counts
        *batches*; gptnano counts optimizer steps, so the Trainer gets n * k. (``log_every_n_steps``,
        ``max_steps`` and ``last_every_n_steps`` already count updates.) The saved config keeps n."""
        k, n = trainer.get("accumulate_grad_batches") or 1, trainer.get("val_check_interval")
        if isinstance(k, int) and k > 1 and isinstance(n, int) and not isinstance(n, bool):
            return {"val_check_interval": n * k}
        return {}

    def _callbacks(self, trainer: dict) -> list:
        """The user's callbacks, then gptnano's (a learning-rate card only where there is a logger), then the
        progress bar and model summary, the same wherever gptnano runs: Lightning's tqdm bar on a terminal
        and plain log lines elsewhere (gptnano/train/progress.py), never Rich ones just because ``rich`` is
        installed; not when turned off, or where the user gave one of that kind."""
        given = trainer.get("callbacks") or []
        given = list(given) if isinstance(given, list) else [given]
        ours = [RunReport(), Throughput(), TextSample(), PredictionWriter(), RunSettings(), NonFiniteGuard()]
        if trainer.get("logger") is not False:
            ours.append(LearningRateMonitor("step"))
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            ours.append(TQDMProgressBar() if is_terminal(sys.stdout) else LogLines())
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
            ours.append(ModelSummary())
        return [*given, *ours]

    # ----- before the first step: can the run's outputs be written? ----------
    def _check_outputs(self) -> None:
        """A folder the run cannot write is refused in one line before any data is prepared or any step
        taken. Nothing is created here: a mistake found later leaves no folder behind."""
        if self.trainer.global_rank != 0:
            return
        for callback in self.trainer.checkpoint_callbacks:
            if self.subcommand == "fit" and isinstance(callback, Checkpoint) and callback.dirpath:
                _OUTPUTS.append(os.path.relpath(callback.dirpath))
                check_writable_folder(callback.dirpath, "checkpoints", create=False)
        for logger in self.trainer.loggers:
            if getattr(logger, "save_dir", None):
                _OUTPUTS.append(str(Path(logger.save_dir) / str(logger.name or "")))
                check_writable_folder(_OUTPUTS[-1], "logs", create=False)

    before_fit = before_validate = before_test = before_predict = _check_outputs


def parser_error(text: str) -> str:
    """jsonargparse's error (several indented lines after ``error:``) as one line."""
    found = text.split("error:", 1)
    body = found[1] if len(found) == 2 else (text.strip().splitlines() or ["the configuration did not parse"])[-1]
    return " ".join(body.split())[:400]


def resolved_config(argv: list[str]) -> dict:
    """The config ``gptnano fit ARGV`` would run, as plain data: a checkpoint's config as the base
    when ``--ckpt_path`` is given, the command line over it, the run's name, folders and text
    resolved, every setting fit refuses refused. Nothing is built and nothing trained; unlike fit,
    a folder that already holds a run is not refused. What fit prints on the way is not shown.

    Raises:
        UserError: one line, for any mistake fit would stop at before building the classes.
    """
    out, err = io.StringIO(), io.StringIO()
    environ = dict(os.environ)  # seeding (LightningCLI._set_seed) writes PL_GLOBAL_SEED there
    logged = logging.root.manager.disable  # Lightning logs ("Seed set to ...") to the stream it found at import
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            GPTNanoCLI(args=["fit", *argv], resolve_only=True)
    except _Resolved as done:
        return done.config
    except SystemExit:  # the parser printed its error (or a --help) and exited
        raise UserError(parser_error(err.getvalue())) from None
    finally:
        logging.disable(logged)
        os.environ.clear()
        os.environ.update(environ)
    raise RuntimeError("GPTNanoCLI(resolve_only=True) built its classes")  # before_instantiate_classes did not stop


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
        _exit_stopped()
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        if STOP.is_set():
            _exit_stopped()  # what failed after a stop signal was a write to the terminal that is gone
        refused = os_error_in(e)
        if refused is None:
            raise
        where = refused.filename or (f"a file in {' or '.join(_OUTPUTS)}" if _OUTPUTS else "a file of the run")
        raise write_error(where, refused,
                          "checkpoints and logs written before it are intact (a checkpoint is written "
                          "whole or not at all)") from None
    finally:
        threading.excepthook = previous_hook


def _exit_stopped() -> None:
    """Exit as a shell reports the signal that stopped the fit (Checkpoint.on_exception saved and said
    where). Output that can no longer reach a closed terminal is dropped, so that Python's own flush at
    exit cannot turn the status into 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            except (OSError, ValueError):
                pass
    sys.exit(stop_exit_status())
