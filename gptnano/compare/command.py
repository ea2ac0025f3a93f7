"""`gptnano compare`: train configs (and grid points) for the same budget over several seeds,
each run a real `gptnano fit` in its own process, and rank them only as far as the seeds allow.

    gptnano compare configs/gpt.yaml configs/rnn.yaml configs/backpack.yaml configs/cnn.yaml --budget 5min --seeds 3

Everything goes to compare/<name>/: the runs' checkpoints/ and lightning_logs/, one record
per run in runs/ (its configuration's hash, schedule and result), each fit's output in
logs/, and results.md, results.json, results.png. Running the same command again skips
finished runs, resumes an interrupted one from its last.ckpt, then redraws the results.
docs/compare.md explains budgets, seeds, the statistics and the outputs.
"""

import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gptnano import lines
from gptnano.compare import budgets, resolve, stats
from gptnano.errors import UserError
from gptnano.files import atomic_write

ROOT = Path("compare")
# Flags of `fit` that a comparison sets for every run itself -> why the user may not.
OWNED = {
    "trainer.max_steps": "--budget sets each run's steps",
    "trainer.max_time": "--budget sets each run's length (a time limit would cut its schedule short)",
    "seed_everything": "--seeds sets it, together with data.seed",
    "data.seed": "--seeds sets it, together with seed_everything",
    "run_name": "runs are named after their config, grid point and seed",
    "ckpt_path": "compare resumes an interrupted run from its last.ckpt itself",
    "trainer.val_check_interval": "--validations sets it, so that the last step is a validation",
    "model.lr_decay_steps": "the learning rate decays over each run's budget",
    "checkpoint.dirpath": "runs keep their checkpoints under compare/NAME/",
    "trainer.logger": "runs log under compare/NAME/lightning_logs/",
    "early_stopping": "every run finishes its schedule",
    "print_config": "--dry_run shows what each run would be",
}
# Settings that change nothing a comparison measures: left out of a run's hash.
COSMETIC = ("trainer.enable_progress_bar", "trainer.enable_model_summary", "weights_only")
# Lightning's Timer measures each run's training time, and a resumed run carries it on. Its interval is
# given as text: the enum default would stop fit's SaveConfigCallback from writing config.yaml.
TIMER = {"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"interval": "step"}}
HEARTBEAT_S = 60.0  # a progress line at least this often while a run trains
POLL_S = 0.25


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message)


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="gptnano compare", formatter_class=argparse.RawDescriptionHelpFormatter,
                usage="gptnano compare CONFIG... --budget B [--seeds N] [--name NAME] [--grid KEY=V1,V2,...] "
                      "[--validations N] [--parallel K] [--dry_run] [fit flags for every run]",
                description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                epilog="Any other flag is a `gptnano fit` flag given to every run (e.g. --data.path FILE, "
                       "--model.net.dropout 0.1); it takes a value. These are set by compare and refused: "
                       + ", ".join(f"--{k}" for k in OWNED) + ".")
    ap.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs of `gptnano fit` to compare")
    ap.add_argument("--budget", required=True, help="what every run gets: " + budgets.EXAMPLES + ". Steps, warmup "
                    "and learning-rate decay are fitted to it; only wall time depends on the machine")
    ap.add_argument("--seeds", type=int, default=3, help="runs per entry, seeds 0..N-1; a seed sets seed_everything "
                    "and data.seed (initialisation, dropout, order of training windows) (default: 3)")
    ap.add_argument("--name", help="folder under compare/ (default: the configs' names and the budget)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="train every config at each value of a fit flag, e.g. model.muon_lr=0.01,0.02,0.04; "
                         "several --grid form their product")
    ap.add_argument("--validations", type=int, default=10, help="validation passes per run, evenly spaced, the "
                    "last at the final step (between half and twice this many, to fit the steps) (default: 10)")
    ap.add_argument("--parallel", type=int, default=1, metavar="K", help="run K at a time, one per GPU (GPUs only: "
                    "on a CPU parallel runs would distort every speed and time budget) (default: 1)")
    ap.add_argument("--dry_run", action="store_true", help="check everything and print each entry's schedule; "
                    "train nothing")
    return ap


# ----- the command line -------------------------------------------------------------------
OWN_WITH_VALUE = ("--budget", "--seeds", "--name", "--grid", "--validations", "--parallel")


def _is_option(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
        return False  # a negative number is a value
    except ValueError:
        return True


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(compare's own arguments and the configs, the fit flags for every run). A fit flag
    takes one value (``--model.net.dropout 0.1`` or ``--model.net.dropout=0.1``)."""
    own, fit = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in OWN_WITH_VALUE:
            own += argv[i:i + (1 if "=" in token else 2)]
            i += 1 if "=" in token else 2
        elif token in ("--dry_run", "-h", "--help") or not _is_option(token):
            own.append(token)
            i += 1
        else:
            takes_next = "=" not in token and i + 1 < len(argv) and not _is_option(argv[i + 1])
            fit += argv[i:i + 1 + takes_next]
            i += 1 + takes_next
    return own, fit


def flag_key(token: str) -> str:
    """``--model.init_args.dropout=0.1`` -> ``model.dropout``."""
    return token.lstrip("-").split("=", 1)[0].replace(".init_args.", ".")


def owned_reason(key: str) -> str | None:
    for owned, why in OWNED.items():
        if key == owned or key.startswith(owned + "."):
            return why
    return None


def check_fit_flags(fit_flags: list[str]) -> None:
    for token in fit_flags:
        if _is_option(token) and (why := owned_reason(flag_key(token))):
            raise UserError(f"{token.split('=', 1)[0]} is set by compare for every run ({why})")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``model.muon_lr=0.01,0.02`` -> [("model.muon_lr", ["0.01", "0.02"])], one per --grid."""
    grid = []
    for spec in specs:
        key, _, values = spec.partition("=")
        key = flag_key(key.strip())
        items = [v.strip() for v in values.split(",")]
        if not key or not values or any(v == "" for v in items):
            raise UserError(f"bad --grid {spec!r}: give KEY=V1,V2,... (e.g. model.muon_lr=0.01,0.02)")
        if why := owned_reason(key):
            raise UserError(f"--grid {key}: set by compare for every run ({why})")
        if key in (k for k, _ in grid):
            raise UserError(f"--grid {key} is given twice: list all its values in one --grid")
        grid.append((key, items))
    return grid


def check_config(path: str) -> None:
    """A CONFIG must be a readable YAML mapping (the real parser checks its keys later)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config not found: {path}")
    try:
        content = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = " ".join(str(e).split())[:160]
        raise UserError(f"{path} is not a readable YAML config: {first}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a config: its YAML is not a mapping of settings")


# ----- entries: a config at a grid point -------------------------------------------------
@dataclass
class Point:
    config: str
    grid: dict[str, str]
    label: str
    facts: dict = field(default_factory=dict)  # what fit's parser resolved (gptnano/compare/resolve.py), and more

    def flags(self) -> list[str]:
        return [a for key, value in self.grid.items() for a in (f"--{key}", value)]


def make_points(configs: list[str], grid: list[tuple[str, list[str]]]) -> list[Point]:
    stems = [Path(c).stem for c in configs]
    # A config's name, or its path where two configs share a name (configs/gpt.yaml, configs/gpu/gpt.yaml).
    names = [s if stems.count(s) == 1 else stats.safe_name(str(Path(c).with_suffix("")))
             for s, c in zip(stems, configs)]
    if len(set(names)) < len(names):
        raise UserError("a config is given twice")
    points = []
    for config, name in zip(configs, names):
        for values in itertools.product(*[v for _, v in grid]):
            assignment = dict(zip([k for k, _ in grid], values))
            shown = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in assignment.items())
            points.append(Point(config, assignment, stats.safe_name(name + (f"-{shown}" if shown else ""))))
    if len({p.label for p in points}) < len(points):
        raise UserError("two grid keys end in the same name: their runs would be named alike")
    return points


# ----- what a run is -----------------------------------------------------------------------
def _without(config: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        config = config.get(p) if isinstance(config, dict) else None
    if isinstance(config, dict):
        config.pop(last, None)


def config_hash(config: dict, budget: budgets.Budget, seed: int, validations: int, text_sha256: str) -> str:
    """The identity of a run: its resolved configuration (less what compare sets per run and
    what changes nothing measured), its budget, seed and validations, and the text's content."""
    config = copy.deepcopy(config)
    for key in (*OWNED, *COSMETIC):
        _without(config, key)
    blob = json.dumps({"config": config, "budget": [budget.kind, budget.amount], "seed": seed,
                       "validations": validations, "text": text_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def pinned_accelerator(trainer: dict, device: str) -> str | None:
    """The ``--trainer.accelerator`` every run of an entry gets, or None (its own setting stands).

    A fit given no accelerator on a machine that has one times it against the CPU and may pick
    either (gptnano/devices.py), run by run; a comparison plans for one device (``device``,
    Lightning's rule, which picks the accelerator) and gives it to every run, so that no entry
    trains on another device than the others. A CPU-only machine has nothing to pin."""
    return device if trainer.get("accelerator") in (None, "auto") and device != "cpu" else None


def world_size(trainer: dict, device: str, parallel: int) -> int:
    """Processes a run trains in (devices x nodes), as Lightning will count them."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif device == "cuda" and parallel == 1:  # "auto" or -1: every GPU it sees
        import torch

        n = torch.cuda.device_count()
    else:
        n = 1
    return n * int(trainer.get("num_nodes") or 1)


def eval_batches(facts: dict) -> int:
    """Validation batches of one pass (gptnano/data/datamodule.py's split and windows)."""
    data, n, block = facts["config"]["data"], facts["n_tokens"], facts["block_size"]
    val = int(n * (1 - data["test_fraction"])) - int(n * (1 - data["val_fraction"] - data["test_fraction"]))
    windows = math.ceil(max(1, val - 1) / block)
    if data.get("val_tokens"):
        windows = min(windows, math.ceil(data["val_tokens"] / block))
    return math.ceil(windows / data["eval_batch_size"])


@dataclass
class Run:
    name: str
    point: Point
    seed: int
    hash: str
    record: dict | None = None  # runs/<name>.json, once started

    @property
    def done(self) -> bool:
        return bool(self.record) and self.record.get("status") == "done"


@dataclass
class Job:
    run: Run
    proc: subprocess.Popen
    started: float
    index: int
    log: object
    beat: float = 0.0


def _pdeathsig():
    """Linux only: what a fit runs in its process before it starts, so that it gets a SIGTERM
    when compare dies, however it dies (even by SIGKILL): it then saves last.ckpt and stops
    instead of training on unwatched into the folder of a run the next compare resumes. libc
    is opened here, in compare, so the child between fork and exec only makes one call."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class Comparison:
    """One `gptnano compare` command: its entries, runs, records and outputs."""

    def __init__(self, args, fit_flags: list[str], argv: list[str]):
        self.args, self.fit_flags, self.argv = args, fit_flags, argv
        self.budget = budgets.parse_budget(args.budget)
        if args.seeds < 1:
            raise UserError(f"--seeds {args.seeds}: give at least 1 (mean ± std needs 2)")
        if args.validations < 1:
            raise UserError(f"--validations {args.validations}: give at least 1")
        if args.parallel < 1:
            raise UserError(f"--parallel {args.parallel}: give at least 1")
        check_fit_flags(fit_flags)
        grid = parse_grid(args.grid)
        for config in args.configs:
            check_config(config)
        self.points = make_points(args.configs, grid)
        stems = "-".join(dict.fromkeys(Path(c).stem for c in args.configs))
        self.name = stats.safe_name(args.name or f"{stems}-{self.budget.text}")
        self.folder = ROOT / self.name
        self.done_now: list[Run] = []  # finished by this command: their pace makes the ETA
        self.die_with_me = _pdeathsig()

    # ----- before any training -----------------------------------------------------------
    def prepare(self) -> None:
        from gptnano import hardware

        self.check_recorded_command()
        if self.args.parallel > 1:
            self.check_gpus()
        self.env = dict(os.environ)
        if not self.reuse_resolved():
            for p, got in zip(self.points, resolve.resolve(self.requests(), self.env)):
                if "error" in got:
                    where = p.config + "".join(f" --grid {k}={v}" for k, v in p.grid.items())
                    raise UserError(f"{where}: {got['error']}")
                p.facts = got
        # One arithmetic for every run of the comparison, chosen once (and kept by a rerun): measured
        # in each fit, a noisy bf16 probe could give two architectures different precisions.
        self.precisions = dict(self.recorded.get("precisions") or {})
        if self.recorded.get("fast_bf16") in ("0", "1"):
            self.env.setdefault(hardware.FAST_BF16_ENV, self.recorded["fast_bf16"])
        for p in self.points:
            trainer = p.facts["config"]["trainer"]
            p.facts["device"] = device = hardware.device_type(trainer.get("accelerator"))
            p.facts["accelerator"] = pinned_accelerator(trainer, device)
            if device == "cpu":  # Muon's dtype ("auto") follows the same verdict in every fit and in the probe
                if hardware.FAST_BF16_ENV not in self.env:
                    self.env[hardware.FAST_BF16_ENV] = "1" if hardware.bf16_verdict("cpu").fast else "0"
                os.environ[hardware.FAST_BF16_ENV] = self.env[hardware.FAST_BF16_ENV]
                hardware.bf16_verdict.cache_clear()
            if device not in self.precisions:
                self.precisions[device] = hardware.resolve_precision(device)[0]
            p.facts["precision_given"] = trainer.get("precision") is not None
            p.facts["precision"] = trainer.get("precision") or self.precisions[device]
            data = p.facts["config"]["data"]
            p.facts["tokens_per_step"] = (data["batch_size"] * p.facts["block_size"]
                                          * int(trainer.get("accumulate_grad_batches") or 1)
                                          * world_size(trainer, device, self.args.parallel))
        self.check_parallel()
        self.runs = []
        for p in self.points:
            for seed in range(self.args.seeds):
                identity = config_hash(p.facts["config"], self.budget, seed, self.args.validations,
                                       p.facts["text_sha256"])
                self.runs.append(Run(f"{p.label}-s{seed}", p, seed, identity))
        self.plans = {}
        if not self.budget.machine_dependent:
            for p in self.points:
                self.plans[p.label] = self.plan_point(p)
        for run in self.runs:
            run.record = self.read_record(run)
            if run.record and run.record.get("hash") != run.hash:
                raise UserError(f"{self.folder} holds run {run.name} of another command (its configuration, budget, "
                                f"seed or text differ): give another --name, or delete {self.folder}")

    def requests(self) -> list[list[str]]:
        return [["--config", p.config, *self.fit_flags, *p.flags()] for p in self.points]

    def reuse_resolved(self) -> bool:
        """Take the entries' facts from resolved.json when nothing they came from has changed
        (the fit command lines, the config files, the text, gptnano's and the parser's code):
        a rerun that only resumes or redraws then starts in a second."""
        try:
            saved = json.loads((self.folder / "resolved.json").read_text(encoding="utf-8"))
            if saved["key"] != resolve.key(self.requests(), self.env):
                return False
            facts = saved["facts"]
            if len(facts) != len(self.points) or any(resolve.file_stat(f["text"]) != f["text_stat"] for f in facts):
                return False
        except (OSError, ValueError, KeyError, TypeError):
            return False
        for p, f in zip(self.points, facts):
            p.facts = f
        return True

    def save_resolved(self) -> None:
        facts = [{k: v for k, v in p.facts.items() if k in resolve.FACTS} for p in self.points]
        for f in facts:
            f["text_stat"] = resolve.file_stat(f["text"])
        atomic_write(self.folder / "resolved.json", json.dumps(
            {"key": resolve.key(self.requests(), self.env), "facts": facts}, default=str) + "\n")

    def check_recorded_command(self) -> None:
        """Every run's identity holds the budget and the validations: if they changed, every
        recorded run would differ, which is said at once, before the configs are resolved."""
        self.recorded = {}
        try:
            recorded = json.loads((self.folder / "compare.json").read_text(encoding="utf-8"))
            before = (budgets.parse_budget(recorded["budget"]), recorded["validations"])
        except (OSError, ValueError, KeyError, TypeError, UserError):
            return  # nothing recorded yet (or not by compare): the runs' own records decide
        self.recorded = recorded
        now = (self.budget, self.args.validations)
        if (before[0].kind, before[0].amount, before[1]) != (now[0].kind, now[0].amount, now[1]):
            raise UserError(f"{self.folder} holds runs of another command (--budget {before[0].text}, --validations "
                            f"{before[1]}): give another --name, or delete {self.folder}")

    def check_gpus(self) -> None:
        import torch

        k, have = self.args.parallel, torch.cuda.device_count()
        if have < k:
            why = " (on a CPU, parallel runs would share its cores and distort every speed and time budget)"
            raise UserError(f"--parallel {k} runs one run per GPU and needs {k} GPUs; this machine has {have}"
                            + ("" if have else why))

    def check_parallel(self) -> None:
        k = self.args.parallel
        if k > 1 and any(p.facts["device"] != "cuda" for p in self.points):
            raise UserError(f"--parallel {k} runs one run per GPU, and these runs train on a CPU: parallel runs would "
                            "share its cores and distort every speed and time budget; leave --parallel out")

    def plan_point(self, p: Point, probe: budgets.Probe | None = None, slowdown: float = 1.0) -> budgets.Plan:
        f = p.facts
        common = dict(tokens_per_step=f["tokens_per_step"], flops_per_token=f["flops_per_token"],
                      warmup=int(f["config"]["model"].get("warmup_steps") or 0), validations=self.args.validations,
                      label=p.label)
        if probe is None:
            return budgets.plan(self.budget, **common)
        return budgets.fit_to_time(self.budget, probe, slowdown=slowdown, **common)

    def probe(self, p: Point, slot: int) -> budgets.Probe:
        f = p.facts
        data = f["config"]["data"]
        device = f"cuda:{slot}" if f["device"] == "cuda" else f["device"]
        world = max(1, f["tokens_per_step"] // (data["batch_size"] * f["block_size"]))
        return budgets.probe_run(f["net"], f["config"]["model"], device=device, precision=f["precision"],
                                 batch_size=data["batch_size"], block_size=f["block_size"],
                                 eval_batch_size=data["eval_batch_size"], eval_batches=max(1, eval_batches(f) // world))

    def slowdown(self) -> float:
        """Real over predicted training time of the wall-time runs done so far (1 before any):
        what the probe does not see (Lightning's own work per step, checkpoints, a busy machine)."""
        ratios = [r.record["result"]["train_s"] / r.record["plan"]["predicted_s"] for r in self.runs
                  if r.done and r.record["plan"].get("predicted_s") and math.isfinite(r.record["result"]["train_s"])]
        return sorted(ratios)[len(ratios) // 2] if ratios else 1.0

    # ----- records ---------------------------------------------------------------------
    def record_path(self, run: Run) -> Path:
        return self.folder / "runs" / f"{run.name}.json"

    def read_record(self, run: Run) -> dict | None:
        path = self.record_path(run)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a record is written atomically: this is not one of ours, start the run again

    def write_record(self, run: Run) -> None:
        atomic_write(self.record_path(run), json.dumps(run.record, indent=1, default=str) + "\n")

    def checkpoints(self, run: Run) -> Path:
        return self.folder / "checkpoints" / run.name

    def logs(self, run: Run) -> Path:
        return self.folder / "lightning_logs" / run.name

    def fit_argv(self, run: Run, plan: budgets.Plan) -> list[str]:
        p = run.point
        logger = {"class_path": "gptnano.train.logger.Board",
                  "init_args": {"save_dir": str(self.folder / "lightning_logs"), "name": run.name}}
        argv = ["--config", p.config, "--trainer.enable_progress_bar", "false", *self.fit_flags, *p.flags(),
                "--seed_everything", str(run.seed), "--data.seed", str(run.seed),
                "--trainer.max_steps", str(plan.steps), "--trainer.val_check_interval", str(plan.val_every),
                "--model.warmup_steps", str(plan.warmup), "--model.lr_decay_steps", str(plan.steps),
                "--early_stopping.patience", str(plan.validations + 1),  # never stops a run early
                "--run_name", run.name, "--checkpoint.dirpath", str(self.checkpoints(run)),
                "--trainer.logger", json.dumps(logger), "--trainer.callbacks+=" + json.dumps(TIMER)]
        if not p.facts["precision_given"]:  # one choice for every run, made once here
            argv += ["--trainer.precision", p.facts["precision"]]
        if p.facts.get("accelerator"):  # likewise the device (pinned_accelerator)
            argv += ["--trainer.accelerator", p.facts["accelerator"]]
        return argv

    # ----- running ---------------------------------------------------------------------
    def start(self, run: Run, index: int, slot: int) -> Job:
        last = self.checkpoints(run) / "last.ckpt"
        resume = bool(run.record) and last.is_file()
        if resume:
            from gptnano.checkpoint import read_checkpoint

            step = int(read_checkpoint(last).get("global_step", 0))
            run.record.setdefault("resumed_at", []).append(step)
            what = f"resuming from step {step} of {run.record['plan']['steps']}"
        else:
            for folder in (self.checkpoints(run), self.logs(run)):
                shutil.rmtree(folder, ignore_errors=True)  # a start that left no checkpoint: start again
            plan = self.plans.get(run.point.label)
            if plan is None:  # wall time: fitted to a probe of this machine just before the run
                lines.say(f"compare {self.name}", f"run {index}/{len(self.runs)} {run.name}", "probing real steps")
                plan = self.plan_point(run.point, self.probe(run.point, slot), self.slowdown())
            from gptnano.hardware import machine_info

            run.record = {"run": run.name, "entry": run.point.label, "config": run.point.config,
                          "grid": run.point.grid, "seed": run.seed, "hash": run.hash, "status": "started",
                          "plan": {**plan.__dict__, "tokens": plan.tokens, "flops": plan.flops},
                          "precision": run.point.facts["precision"], "argv": self.fit_argv(run, plan),
                          "facts": {k: run.point.facts[k] for k in ("text", "text_sha256", "vocab_size", "params",
                                                                     "flops_per_token", "tokens_per_step")},
                          "machine": machine_info(), "process_s": 0.0}
            what = (f"{plan.steps} steps, {lines.quantity(plan.tokens)} tok, {plan.flops:.3g} FLOP, "
                    f"validating every {plan.val_every}")
        self.write_record(run)
        lines.say(f"compare {self.name}", f"run {index}/{len(self.runs)} {run.name}", what, self.eta())
        env = dict(self.env)
        if self.args.parallel > 1:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            env["CUDA_VISIBLE_DEVICES"] = visible[slot] if len(visible) > slot and visible[slot] else str(slot)
        log_path = self.folder / "logs" / f"{run.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")
        cmd = [sys.executable, "-m", "gptnano", "fit", *run.record["argv"]]
        cmd += ["--ckpt_path", "last"] if resume else []
        log.write(f"$ gptnano {' '.join(cmd[3:])}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=self.die_with_me)
        now = time.monotonic()
        return Job(run, proc, now, index, log, beat=now)

    def finish(self, job: Job) -> None:
        run, log = job.run, job.log
        log.close()
        run.record["process_s"] = run.record.get("process_s", 0.0) + time.monotonic() - job.started
        code = job.proc.returncode
        if code != 0:
            self.write_record(run)
            if code in (130, 143, -signal.SIGINT, -signal.SIGTERM):  # stopped from outside, not failed
                raise UserError(f"run {run.name} was stopped by a signal (exit {code}); run the same command "
                                "again to resume it")
            raise UserError(f"run {run.name} failed (exit {code}): {self.last_error(run)}; "
                            f"its output: {log.name}; run the same command again to resume it")
        result = stats.read_result(self.logs(run), self.checkpoints(run) / "last.ckpt", run.record["plan"]["steps"])
        run.record.update(status="done", result=result)
        self.write_record(run)
        self.done_now.append(run)
        lines.say(f"compare {self.name}", f"done {job.index}/{len(self.runs)} {run.name}",
                  f"final val loss {result['final_val_loss']:.4f}",
                  f"trained {lines.duration(result['train_s'])}", self.eta())

    def last_error(self, run: Run) -> str:
        try:
            text = (self.folder / "logs" / f"{run.name}.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "no output"
        found = [line for line in text.splitlines() if line.startswith("gptnano: error:")]
        last = found[-1] if found else (text.strip().splitlines() or ["no output"])[-1]
        return last.removeprefix("gptnano: error: ")[:150]

    def eta(self, elapsed: float = 0.0) -> str:
        """``ETA 12m30s``: the runs left at the pace of those this command finished (process time
        per FLOP; per run for wall-time budgets), less what the current run has done."""
        left = [r for r in self.runs if not r.done]
        if not left:
            return ""
        if not self.done_now:
            return "ETA after the first run"
        if self.budget.machine_dependent:
            per_run = sum(r.record["process_s"] for r in self.done_now) / len(self.done_now)
            seconds = per_run * len(left)
        else:
            done_flops = sum(r.record["plan"]["flops"] for r in self.done_now)
            seconds = sum(r.record["process_s"] for r in self.done_now) / done_flops * sum(
                self.plans[r.point.label].flops for r in left)
        remaining = seconds / self.args.parallel - elapsed
        if remaining <= 0 and left:
            return "ETA ? (slower than the runs so far)"
        return f"ETA {lines.duration(max(0.0, remaining))}"

    def execute(self) -> None:
        todo = [(i, r) for i, r in enumerate(self.runs, 1) if not r.done]
        started = sum(1 for _, r in todo if r.record)
        machine = " (wall time: machine-dependent)" if self.budget.machine_dependent else ""
        lines.say(f"compare {self.name}",
                  f"{len(self.points)} entries x {self.args.seeds} seeds = {len(self.runs)} runs",
                  f"{len(self.runs) - len(todo)} done", f"{started} to resume" if started else "",
                  f"budget {self.budget.text}{machine}", f"output of each fit in {self.folder / 'logs'}")
        free, running = list(range(self.args.parallel)), {}
        try:
            while todo or running:
                while todo and free:
                    slot = free.pop(0)
                    index, run = todo.pop(0)
                    running[slot] = self.start(run, index, slot)
                time.sleep(POLL_S)
                for slot, job in list(running.items()):
                    if job.proc.poll() is not None:
                        del running[slot]
                        free.append(slot)
                        self.finish(job)
                    elif time.monotonic() - job.beat >= HEARTBEAT_S:
                        job.beat = time.monotonic()
                        elapsed = job.beat - job.started
                        lines.say(f"compare {self.name}", f"run {job.index}/{len(self.runs)} {job.run.name}",
                                  f"training for {lines.duration(elapsed)}", self.eta(elapsed))
        except KeyboardInterrupt:
            self.stop(running.values())
            names = ", ".join(f"{j.index}/{len(self.runs)} {j.run.name}" for j in running.values())
            lines.say(f"compare {self.name}", f"stopped during run {names}" if names else "stopped",
                      "run the same command again to resume")
            raise
        except BaseException:
            self.stop(running.values())
            raise

    def stop(self, jobs) -> None:
        """Ask each fit to stop (SIGTERM: Lightning ends the step, gptnano saves last.ckpt) and wait."""
        for job in jobs:
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)
        for job in jobs:
            try:
                job.proc.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for the checkpoint
                job.proc.kill()
            job.run.record["process_s"] = job.run.record.get("process_s", 0.0) + time.monotonic() - job.started
            self.write_record(job.run)
            job.log.close()

    # ----- outputs ---------------------------------------------------------------------
    def dry_run(self) -> None:
        cols = ["entry", "params", "FLOPs/token", "tokens/step", "steps", "validate every", "warmup", "tokens", "FLOPs",
                "runs"]
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for p in self.points:
            plan = self.plans.get(p.label) or self.plan_point(p, self.probe(p, 0))
            seeds = [r for r in self.runs if r.point is p]
            state = f"{sum(r.done for r in seeds)}/{len(seeds)} done"
            print(f"| {p.label} | {p.facts['params']} | {p.facts['flops_per_token']:.4g} | {plan.tokens_per_step} | "
                  f"{plan.steps} | {plan.val_every} | {plan.warmup} | {plan.tokens} | {plan.flops:.4g} | {state} |")
        if self.budget.machine_dependent:
            print("\nSteps of a wall-time budget come from a probe of real steps: these from one just now; "
                  "each run is probed again just before it starts.")

    def report(self) -> list[Path]:
        from gptnano.hardware import machine_info, machine_line

        finished = [r for r in self.runs if r.done]
        entries = {p.label: stats.entry_stats([r.record for r in finished if r.point is p]) for p in self.points
                   if any(r.point is p for r in finished)}
        warnings = []
        if self.budget.machine_dependent:
            for r in finished:
                off = r.record["result"]["train_s"] / self.budget.amount - 1
                if abs(off) > 0.05:
                    warnings.append(f"{r.name} trained {r.record['result']['train_s']:.0f} s, {100 * off:+.0f} % "
                                    f"off its {self.budget.text} budget")
        machine = machine_info()
        texts = sorted({p.facts["text"] for p in self.points})
        report = {"name": self.name, "command": ["gptnano", "compare", *self.argv], "budget_text": self.budget.text,
                  "budget": self.budget.describe(), "budget_kind": self.budget.kind,
                  "budget_amount": self.budget.amount,
                  "seeds": self.args.seeds, "validations": self.args.validations, "text": ", ".join(texts),
                  "precision": ", ".join(sorted({r.record["precision"] for r in finished})),
                  "machine": machine, "machine_line": machine_line(machine), "entries": entries,
                  "ranking": [{"entry": label, "vs_above": verdict} for label, _, verdict in stats.ranking(entries)],
                  "warnings": warnings, "runs": [r.record for r in finished]}
        md = atomic_write(self.folder / "results.md", stats.markdown(report))
        js = stats.write_json(self.folder / "results.json", report)
        png = self.folder / "results.png"
        written = [md, js]
        if stats.plot(report, report["runs"], png):
            written.append(png)
        else:
            lines.say("results.png not drawn: plotting needs matplotlib (pip install 'gptnano[plot]')")
        print(stats.markdown(report))
        return written

    def write_command(self) -> None:
        from gptnano.hardware import FAST_BF16_ENV

        self.save_resolved()
        atomic_write(self.folder / "compare.json", json.dumps(
            {"command": ["gptnano", "compare", *self.argv], "budget": self.budget.text, "seeds": self.args.seeds,
             "validations": self.args.validations, "precisions": self.precisions,
             "fast_bf16": self.env.get(FAST_BF16_ENV), "entries": [p.label for p in self.points],
             "runs": {r.name: r.hash for r in self.runs}}, indent=1) + "\n")


def main(argv: list[str]) -> None:
    own, fit_flags = split_argv(argv)
    args = parser().parse_args(own)
    comparison = Comparison(args, fit_flags, argv)
    comparison.prepare()
    if args.dry_run:
        comparison.dry_run()
        return
    comparison.write_command()
    comparison.execute()
    written = comparison.report()
    lines.say(f"compare {comparison.name}", "wrote " + ", ".join(str(p) for p in written))
