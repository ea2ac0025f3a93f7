"""Lightning's four `gptnano` commands (fit, validate, test, predict; gptnano/cli/main.py
sends them here): LightningCLI with the defaults a user of this tool expects.

What it adds to LightningCLI: a folder per run (``<default_root_dir>/checkpoints/<run_name>/``,
logs in ``lightning_logs/<run_name>/``) so ``--ckpt_path last`` and ``best`` work from a new
process; the config a checkpoint keeps as the parser's base for every command that starts
from it, the command line applying over it (gptnano/cli/settings.py), what it may not change
refused (gptnano/checkpoint.py); the device and the precision chosen for the machine when none
is given (gptnano/devices.py); gptnano's callbacks and TensorBoard logger beside the user's
own; steps that count optimizer updates under gradient accumulation; progress as plain lines
when the output is a file; and one-line errors instead of tracebacks for mistakes a user can fix.
"""

import os
import re
import sys
import threading
from argparse import ArgumentError
from functools import partial
from pathlib import Path
from typing import NoReturn

import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptnano import checkpoint, devices, hardware, lines
from gptnano.checkpoint import architecture, fixed_args, load_grown, read_checkpoint, run_config, run_name
from gptnano.cli import quiet, settings
from gptnano.cli.commands import TOOLS
from gptnano.data.cache import run_text
from gptnano.data.datamodule import DEFAULT_CACHE, SHAKESPEARE_SHA256, ShakespeareDataModule, check_splits
from gptnano.errors import UserError
from gptnano.files import check_writable_folder, os_error_in, write_error
from gptnano.train import trainer_args
from gptnano.train.callbacks import PredictionWriter, ResumableEarlyStopping, TextSample, Throughput
from gptnano.train.checkpointing import STOP, AtomicCheckpointIO, Checkpoint, check_run_folder, stop_exit_status
from gptnano.train.guard import NonFiniteGuard
from gptnano.train.logger import RunSettings, place_board
from gptnano.train.module import LitLM, compile_refused
from gptnano.train.progress import LogLines, is_terminal
from gptnano.train.record import RunConfig, dump_config
from gptnano.train.report import RunReport
from gptnano.train.steps import probe_step

_OUTPUTS: list[str] = []  # the folders this command writes to, for a write error that names no file


class Parser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        # The full usage runs to a hundred lines and buries the error under it.
        (file or sys.stdout).write(f"usage: {self.prog} [options]\n")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # Only where the message is printed: jsonargparse's parsers of the classes a flag names are of this
        # class too (never exiting), and their keys are relative to the flag. Without exits, main() condenses.
        super().error(one_problem(message) if self.exit_on_error else message, ex)


def one_problem(message: str) -> str:
    """jsonargparse's error for a class a flag names (``--trainer.logger+=CSVLogger``), which lists
    why the value fits none of the flag's types over a dozen lines, as the one line that matters:
    what the named class refused, with the flag that supplies a missing argument. Any other
    message, and one whose class's own reason runs over several lines, is returned as it is."""
    problem = re.search(r"Problem with given class_path '([^']+)':\s*(.+?)(?:\n\s*- |\n\s*Given value|\Z)", message,
                        re.S)
    keys = [k.group(1) for k in re.finditer(r'Parser key "([^"]+)"', message) if problem and k.start() < problem.start()]
    if "\n" not in message or not keys or "\n" in problem.group(2).strip():
        return message
    key, reason = keys[-1], problem.group(2).strip()
    required = re.fullmatch(r"the following arguments are required: (.+)", reason)
    if required:
        flags = " ".join(f"--{key}.{name.strip()} VALUE" for name in required.group(1).split(","))
        reason += f" (give {flags} after it)"
    return f"Parser key \"{key}\": Problem with given class_path '{problem.group(1)}': {reason}"


def _say(text: str) -> None:
    """One line to stderr from the process that speaks (the first of a node's ranks, on the first node)."""
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(text, file=sys.stderr)


class Resolved(Exception):
    """How ``GPTNanoCLI(resolve_only=True)`` hands its resolved config out before building anything."""

    def __init__(self, config: dict):
        super().__init__("resolved")
        self.config = config


class GPTNanoCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, resolve_only: bool = False, exit_on_error: bool = True):
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
                           "scratch. Also: " + "; ".join(f"gptnano {k}: {v}" for k, (_, v) in TOOLS.items()) + ".",
                           "exit_on_error": exit_on_error},  # False: a refused flag raises ArgumentError
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
            argv = settings.with_base(argv, cmd.subcommand, checkpoint.without(run_config(self._saved)))
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
        for key, value in trainer_args.check_trainer(cfg.trainer.as_dict(), self._typed).items():
            cfg.trainer[key] = value
        trainer_args.check_callbacks(cfg.as_dict())
        given = cfg.trainer.callbacks
        if isinstance(given, list):  # `--trainer.callbacks+=X` on a resume of a run that has X: one X
            cfg.trainer.callbacks = [c for i, c in enumerate(given) if c not in given[:i]]
        if self._ckpt_path:
            self._from_checkpoint(cfg, sub)
        elif self._saved is not None:
            self._start_from(cfg)
        net_class = checkpoint._known_architectures().get(cfg.model.net.class_path)  # None: the user's own
        if sub == "fit" and cfg.model.get("compile") and net_class and compile_refused(net_class):
            raise UserError(compile_refused(net_class))  # before anything is built; compare asks here too
        name = cfg.run_name = cfg.run_name or cfg.model.net.class_path.rsplit(".", 1)[-1].lower()
        root = cfg.trainer.default_root_dir
        dirpath = cfg.checkpoint.dirpath if "checkpoint.dirpath" in self._typed or not (
            self._saved or "run_name" in self._typed) else None
        folder = settings.run_folder(name, dirpath, root)
        cfg.checkpoint.dirpath = str(folder)
        typed_dir = bool({"trainer.logger", "trainer.logger.save_dir"} & self._typed)
        cfg.trainer.logger = place_board(cfg.trainer.logger, run=name, root=root, step=checkpoint.step_of(self._saved),
                                         save_dir_typed=typed_dir, evaluating=sub in ("validate", "test", "predict"))
        if sub == "predict":
            cfg.trainer.enable_progress_bar = False  # stdout carries the generated text and nothing else
        if sub == "fit" and not self._resolve_only:  # a comparison asks about folders that hold its runs
            check_run_folder(folder, self._ckpt_path, self._saved, cfg.get("init_from"), cfg.trainer.fast_dev_run)
        if "ckpt_path" in cfg:
            cfg.ckpt_path = self._ckpt_path
        if self._resolve_only:
            plain = yaml.safe_load(dump_config(self.parser, self.config))
            raise Resolved(plain[sub] if sub else plain)

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
        checkpoint.refusals(base, cfg.as_dict(), fitting=sub == "fit", fixed=set(fixed), source=path)
        was = base["data"].get("batch_size")
        if sub == "fit" and was and was != cfg.data.batch_size:
            _say(f"gptnano: batch size {was} -> {cfg.data.batch_size} from step {checkpoint.step_of(saved)}: the "
                 "batches differ from an unbroken run's from here on, and an epoch in progress ends at the new length")
        text = (saved.get("gptnano") or {}).get("text")
        if sub != "predict" and text:  # (an older checkpoint recorded no text: it reads the one given)
            asked = cfg.data.path if cfg.data.path != base["data"].get("path") or "data.path" in self._typed else None
            cfg.data.path, line = run_text(text, asked, cfg.data.tokenizer, DEFAULT_CACHE, SHAKESPEARE_SHA256)
            if line:
                _say(line)
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
        if new:
            _say(f"gptnano: {len(new)} characters of the text are new to the model ({new!r}): they get new rows "
                 "in the embedding and output head, after its own")
        return old + new

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._saved is not None and not self._ckpt_path:
            # fit --init_from: the network was just built fresh (seeded) for the new vocabulary; the trained
            # weights replace its own, except the rows of new characters, which stay as a fresh model has them.
            source = self._cfg().init_from
            load_grown(self.model.net, self._saved["state_dict"], source)
            _say(f"gptnano: starting from {source} (step {checkpoint.step_of(self._saved)}): a new run from step 0, "
                 "optimizer and schedule fresh")

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
        probe = partial(probe_step, net, self.model.hparams, self.datamodule.vocab_size, batch_size,
                        trainer.get("precision"))
        choice = devices.choose(work, probe, batch_size * net.block_size, resumed_on=resumed_on,
                                one_device=one_device)
        if not choice.why:
            return {}  # nothing to choose between, nothing to say
        os.environ[devices.DEVICE_ENV] = choice.device
        _say(devices.line(choice, "--trainer.accelerator"))
        return {"accelerator": choice.device}

    def _resumed(self) -> dict:
        """The facts of the run a fit resumes (its device, precision, Muon's dtype), else nothing."""
        return (self._saved or {}).get("gptnano") or {} if self._ckpt_path and self.subcommand == "fit" else {}

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
        _say(lines.line(f"precision {precision} ({why}); --trainer.precision overrides"))
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


def run(argv: list[str], verbose: bool = False, exits: bool = True) -> GPTNanoCLI:
    """Run one of Lightning's four commands (gptnano/cli/main.py sends them here; gptnano/api.py
    calls it from Python with ``exits=False``). Returns the CLI, its trainer and config.

    A write the OS refused anywhere below (a checkpoint, TensorBoard's event files, hparams.yaml,
    config.yaml, predictions), however a library wrapped it, ends as one ``WriteError`` line. With
    ``exits`` a refused flag prints the usage and exits with status 2 and a fit stopped by a signal
    exits as the shell reports that signal; without it (a notebook, where an exit would end the
    kernel's cell with SystemExit), they raise ``UserError`` and ``KeyboardInterrupt``."""
    if not verbose:
        quiet.hide_noise()
    _OUTPUTS.clear()
    previous_hook = threading.excepthook

    def refused_writes_once(args) -> None:
        # TensorBoard writes in a thread and raises the thread's error again in the main one, where it
        # becomes the one WriteError line: the thread's own traceback would only print it twice.
        if os_error_in(args.exc_value) is None:
            previous_hook(args)

    def stopped() -> None:
        if exits:
            _exit_stopped()
        raise KeyboardInterrupt(f"training stopped by {STOP.signal or 'SIGTERM'}; last.ckpt was saved") from None

    threading.excepthook = refused_writes_once
    try:
        return GPTNanoCLI(args=argv, exit_on_error=exits)
    except SIGTERMException:
        stopped()
    except ArgumentError as e:  # only without exits: jsonargparse exits by itself otherwise
        raise UserError(" ".join(part.strip() for part in one_problem(str(e)).splitlines())) from None
    except SystemExit as e:
        if exits or e.code in (0, None):
            raise
        # Lightning ends a fit with sys.exit(1) after a KeyboardInterrupt that gptnano's stop handler
        # did not take (one before the first step, or a second Ctrl-C).
        raise KeyboardInterrupt("training interrupted") from None
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        if STOP.is_set():
            stopped()  # what failed after a stop signal was a write to the terminal that is gone
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
