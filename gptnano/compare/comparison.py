"""One `gptnano compare` command at work: it resolves its entries' configs (asked of fit's
own parser, gptnano/compare/resolve.py), plans every run's schedule for the budget, runs each
as a real `gptnano fit` process (resuming an interrupted one, recording each in runs/, a
failed one as a result), and writes the outputs. One process at a time runs a comparison (an
OS lock on its folder). The command line is gptnano/compare/command.py; what a run is, runs.py.
"""

import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gptnano import lines
from gptnano.compare import budgets, outputs, resolve, runs, stats
from gptnano.errors import UserError
from gptnano.files import atomic_write, lock
from gptnano.numbers import markdown_table, median, quantity

ROOT = Path("compare")
# Lightning's Timer measures each run's training time, and a resumed run carries it on. Its interval is
# given as text: the enum default would stop fit's SaveConfigCallback from writing config.yaml.
TIMER = {"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"interval": "step"}}

HEARTBEAT_S = 60.0  # a progress line at least this often while a run trains
POLL_S = 0.25
# Signals that stop a comparison as Ctrl-C does: each running fit is asked to stop after its step, saving
# last.ckpt (SIGTERM for Ctrl-C, since a fit in the same terminal got the Ctrl-C too, and a second one
# would stop it at once, unsaved), and compare exits as a shell reports the signal (128 + its number).
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


def time_budget(seconds: float, validations: int) -> dict:
    """The callback every run of a wall-time budget gets: gptnano's TimeBudget on the training clock
    (Timer's "train" time, which the budget counts), so that a run whose pace is not what compare's
    probe predicted (a probe has been seen 35 % off on a shared 2-core CPU) plans itself again from
    its own steps: at its 30th step, a fifth of the way in, and after a validation that finds it
    more than 3 % behind or ahead. Its schedule decays over the steps it plans; the record's plan is
    the first guess."""
    return {"class_path": "gptnano.train.budget.TimeBudget",
            "init_args": {"minutes": seconds / 60, "validations": validations, "margin": 0.0, "clock": "training"}}


class Stopped(Exception):
    """A stop signal reached compare (raised by its handler, like KeyboardInterrupt for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Job:
    run: runs.Run
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


def _raise_stopped(number, frame):
    raise Stopped(number)


class Interrupted(Exception):
    """A fit stopped by a signal that compare did not send (someone stopped or killed it)."""

    def __init__(self, job: "Job", code: int):
        super().__init__(f"exit {code}")
        self.job, self.code = job, code
        # compare exits as the fit did: 130, 143, 129, or 128 + the signal that killed it
        self.status = 128 - code if code < 0 else code


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
        runs.check_fit_flags(fit_flags)
        grid = runs.parse_grid(args.grid)
        for config in args.configs:
            runs.check_config(config)
        self.points = runs.make_points(args.configs, grid)
        stems = "-".join(dict.fromkeys(Path(c).stem for c in args.configs))
        self.name = runs.safe_name(args.name or f"{stems}-{self.budget.text}")
        self.folder = ROOT / self.name
        self.done_now: list[runs.Run] = []  # finished by this command: their pace makes the ETA
        self.pending: set[str] = set()  # the runs this command has still to train
        self.die_with_me = _pdeathsig()

    # ----- before any training -----------------------------------------------------------
    def prepare(self) -> None:
        from gptnano import hardware

        self.check_recorded_command()
        if self.args.parallel > 1:
            self.check_gpus()
        self.env = dict(os.environ)
        for p, got in zip(self.points, resolve.resolve(self.requests())):
            if "error" in got:
                raise UserError(f"{self.where(p)}: {got['error']}")
            p.facts = got
        self.check_budget_settings()
        # One arithmetic for every run of the comparison, chosen once (and kept by a rerun): measured
        # in each fit, a noisy bf16 probe could give two architectures different precisions.
        self.precisions = dict(self.recorded.get("precisions") or {})
        if self.recorded.get("fast_bf16") in ("0", "1"):
            self.env.setdefault(hardware.FAST_BF16_ENV, self.recorded["fast_bf16"])
        for p in self.points:
            trainer = p.facts["config"]["trainer"]
            p.facts["device"] = device = hardware.device_type(trainer.get("accelerator"))
            p.facts["accelerator"] = runs.pinned_accelerator(trainer, device)
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
                                          * runs.world_size(trainer, device, self.args.parallel))
        self.check_parallel()
        # Seed by seed: every entry's seed 0, then every entry's seed 1, ... so that a machine whose pace
        # drifts (minutes of a shared CPU, a laptop warming up) slows every entry's runs alike, not one
        # entry's; and a comparison stopped early has every entry at the same number of seeds.
        self.runs = []
        for seed in range(self.args.seeds):
            for p in self.points:
                identity = runs.config_hash(p.facts["config"], self.budget, seed, self.args.validations,
                                       p.facts["text_sha256"])
                self.runs.append(runs.Run(f"{p.label}-s{seed}", p, seed, identity))
        self.plans = {}
        if not self.budget.machine_dependent:
            for p in self.points:
                self.plans[p.label] = self.plan_point(p)
        self.read_records()

    def read_records(self) -> None:
        for run in self.runs:
            run.record = self.read_record(run)
            if run.record and run.record.get("hash") != run.hash:
                raise UserError(f"{self.folder} holds run {run.name} of another command (its configuration, budget, "
                                f"seed or text differ): give another --name, or delete {self.folder}")

    def requests(self) -> list[list[str]]:
        return [["--config", p.config, *self.fit_flags, *p.flags()] for p in self.points]

    @staticmethod
    def where(p: runs.Point) -> str:
        return p.config + "".join(f" --grid {k}={v}" for k, v in p.grid.items())

    def check_budget_settings(self) -> None:
        """Refuse, in one line, a setting of an entry's config or of the fit flags that would end a run
        before its budget and that compare cannot turn off; say in one line which ones it turns off
        for every run (runs.TURNED_OFF; ``fit_argv`` passes them)."""
        found: dict[str, dict] = {}
        for p in self.points:
            try:
                p.facts["turned_off"] = sorted(runs.turned_off(p.facts["config"]))
            except UserError as e:
                raise UserError(f"{self.where(p)}: {e}") from None
            for key in p.facts["turned_off"]:
                found.setdefault(key, {})[p.config] = None
        by_where: dict[tuple, list[str]] = {}
        for key, where in found.items():
            by_where.setdefault(tuple(where), []).append(key)
        if by_where:
            shown = "; ".join(f"{', '.join(keys)} ({', '.join(where)})" for where, keys in by_where.items())
            lines.say(f"compare {self.name}", f"turned off, so that every run trains for its whole budget: {shown}")

    def busy(self) -> str:
        """The one line that refuses a second runner: who runs this comparison, since when."""
        try:
            held = json.loads((self.folder / "runner.json").read_text(encoding="utf-8"))
            who = f"process {held['pid']} (started {held['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        return f"{self.folder} is being run by {who}: wait for it, or stop it"

    def check_not_running(self) -> None:
        """Refuse at once, before the configs are resolved, a comparison another process is running."""
        if (self.folder / "runner.lock").is_file():
            with lock(self.folder / "runner.lock", busy=self.busy):
                pass

    @contextlib.contextmanager
    def sole_runner(self):
        """Hold the comparison's lock for the ``with`` block: a second `gptnano compare` of the same
        folder is refused in one line naming the process that runs it. The lock is the OS's
        (gptnano.files.lock): it goes with its holder, however it dies. Under it, the runs' records
        are read again: what a runner that just finished wrote is what this one goes on from."""
        with lock(self.folder / "runner.lock", busy=self.busy):
            started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
            atomic_write(self.folder / "runner.json", json.dumps({"pid": os.getpid(), "started": started}) + "\n")
            self.check_recorded_command()
            self.read_records()
            yield

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

    def plan_point(self, p: runs.Point, probe: budgets.Probe | None = None, slowdown: float = 1.0) -> budgets.Plan:
        f = p.facts
        common = dict(tokens_per_step=f["tokens_per_step"], flops_per_token=f["flops_per_token"],
                      warmup=int(f["config"]["model"].get("warmup_steps") or 0), validations=self.args.validations,
                      label=p.label)
        if probe is None:
            return budgets.plan(self.budget, **common)
        return budgets.fit_to_time(self.budget, probe, slowdown=slowdown, **common)

    def probe(self, p: runs.Point, slot: int) -> budgets.Probe:
        f = p.facts
        data = f["config"]["data"]
        device = f"cuda:{slot}" if f["device"] == "cuda" else f["device"]
        accumulate = int(f["config"]["trainer"].get("accumulate_grad_batches") or 1)
        world = max(1, f["tokens_per_step"] // (data["batch_size"] * f["block_size"] * accumulate))
        probe = budgets.probe_run(f["net"], f["config"]["model"], device=device, precision=f["precision"],
                                  batch_size=data["batch_size"], block_size=f["block_size"],
                                  eval_batch_size=data["eval_batch_size"],
                                  eval_batches=max(1, runs.eval_batches(f) // world))
        # An optimizer step under accumulation is that many batches forward and backward (the probe times one).
        return budgets.Probe(probe.step_s * accumulate, probe.validation_s)

    def slowdown(self) -> float:
        """The median of real training time over what the probe alone predicted, of the wall-time
        runs done so far (``stats.real_over_predicted``; 1 before any): what the probe does not see
        (Lightning's own work per step, checkpoints, a busy machine)."""
        ratios = [stats.real_over_predicted(r.record) for r in self.runs
                  if r.done and r.record["plan"].get("predicted_s") and math.isfinite(r.record["result"]["train_s"])]
        return median(ratios) if ratios else 1.0

    def entry_pace(self, p: runs.Point) -> tuple[budgets.Probe | None, float]:
        """The probe of this entry's first finished run under a wall-time budget, and the median ratio
        of its finished runs' real training time to what their probe predicted; (None, 1.0) before
        one finishes. A probe taken in compare's own process just before a run has been seen 35 %
        off the run's real pace on a shared 2-core machine, while one entry's runs keep their pace
        within a few percent: so an entry's later seeds are planned from what its first ones really
        took, and its seeds differ by their seed, not by their probes."""
        done = [r.record for r in self.runs if r.point.label == p.label and r.done and r.record.get("pace")
                and r.record["plan"].get("predicted_s") and math.isfinite(r.record["result"]["train_s"])]
        if not done:
            return None, 1.0
        ratio = median([stats.real_over_predicted(d) for d in done])  # real over what the probe alone predicts
        return budgets.Probe(**done[0]["pace"]["probe"]), ratio

    # ----- records ---------------------------------------------------------------------
    def record_path(self, run: runs.Run) -> Path:
        return self.folder / "runs" / f"{run.name}.json"

    def read_record(self, run: runs.Run) -> dict | None:
        path = self.record_path(run)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a record is written atomically: this is not one of ours, start the run again

    def write_record(self, run: runs.Run) -> None:
        atomic_write(self.record_path(run), json.dumps(run.record, indent=1, default=str) + "\n")

    def checkpoints(self, run: runs.Run) -> Path:
        return self.folder / "checkpoints" / run.name

    def logs(self, run: runs.Run) -> Path:
        return self.folder / "lightning_logs" / run.name

    def fit_argv(self, run: runs.Run, plan: budgets.Plan) -> list[str]:
        p = run.point
        logger = {"class_path": "gptnano.train.logger.Board",
                  "init_args": {"save_dir": str(self.folder / "lightning_logs"), "name": run.name}}
        argv = ["--config", p.config, "--trainer.enable_progress_bar", "false", *self.fit_flags, *p.flags(),
                *(a for key in p.facts.get("turned_off", ()) if key != "trainer.logger" for a in (f"--{key}", "null")),
                "--seed_everything", str(run.seed), "--data.seed", str(run.seed),
                "--trainer.max_steps", str(plan.steps), "--trainer.val_check_interval", str(plan.val_every),
                "--model.warmup_steps", str(plan.warmup),
                # never stops a run early (a wall-time run that plans itself again may validate more often)
                "--early_stopping.patience", str(10 * plan.validations + 1),
                "--run_name", run.name, "--checkpoint.dirpath", str(self.checkpoints(run)),
                "--trainer.logger", json.dumps(logger), "--trainer.callbacks+=" + json.dumps(TIMER)]
        if self.budget.machine_dependent:  # the plan is remade inside the run from its own pace (time_budget)
            argv += ["--trainer.callbacks+=" + json.dumps(time_budget(self.budget.amount, plan.validations))]
        # the learning rate decays over the budget's steps, or (null) over those the run plans
        argv += ["--model.lr_decay_steps", "null" if self.budget.machine_dependent else str(plan.steps)]
        if not p.facts["precision_given"]:  # one choice for every run, made once here
            argv += ["--trainer.precision", p.facts["precision"]]
        if p.facts.get("accelerator"):  # likewise the device (runs.pinned_accelerator)
            argv += ["--trainer.accelerator", p.facts["accelerator"]]
        return argv

    # ----- running ---------------------------------------------------------------------
    def start(self, run: runs.Run, index: int, slot: int) -> Job:
        last = self.checkpoints(run) / "last.ckpt"
        resume = bool(run.record) and last.is_file()
        if resume:
            from gptnano.checkpoint import read_checkpoint

            ckpt = read_checkpoint(last)
            step = int(ckpt.get("global_step", 0))
            run.record.setdefault("resumed_at", []).append(step)
            what = f"resuming from step {step} of {stats.planned_steps(ckpt, run.record['plan']['steps'])}"
            if run.failed:  # --retry_failed: from its last checkpoint, written before it failed
                run.record.setdefault("earlier_failures", []).append(run.record.pop("failure", None))
                what = f"retrying: {what}"
            run.record["status"] = "started"
        else:
            for folder in (self.checkpoints(run), self.logs(run)):
                shutil.rmtree(folder, ignore_errors=True)  # a start that left no checkpoint: start again
            retried = "retrying: " if run.failed else ""  # --retry_failed, of a run that left no checkpoint
            plan, probe, slowdown = self.plans.get(run.point.label), None, 1.0
            if plan is None:  # wall time: fitted to this entry's own pace, else to a probe just before the run
                probe, slowdown = self.entry_pace(run.point)
                if probe is None:
                    lines.say(f"compare {self.name}", f"run {index}/{len(self.runs)} {run.name}", "probing real steps")
                    probe, slowdown = self.probe(run.point, slot), self.slowdown()
                plan = self.plan_point(run.point, probe, slowdown)
            from gptnano.hardware import machine_info

            run.record = {"run": run.name, "entry": run.point.label, "config": run.point.config,
                          "grid": run.point.grid, "seed": run.seed, "hash": run.hash, "status": "started",
                          "plan": {**plan.__dict__, "tokens": plan.tokens, "flops": plan.flops},
                          "precision": run.point.facts["precision"], "argv": self.fit_argv(run, plan),
                          "facts": {k: run.point.facts[k] for k in ("text", "text_sha256", "vocab_size", "params",
                                                                     "flops_per_token", "tokens_per_step")},
                          "machine": machine_info(), "process_s": 0.0}
            if probe is not None:  # what its plan came from: the next seeds of its entry plan from its real pace
                run.record["pace"] = {"probe": asdict(probe), "slowdown": slowdown}
            what = (f"{retried}{plan.steps} steps, {quantity(plan.tokens)} tok, {plan.flops:.3g} FLOP, "
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
        """Record how a fit ended: done (its result read), failed (an error line, a non-finite loss, a run
        that ended before its budget: a result, and the other runs go on), or interrupted by a signal
        compare did not send (``Interrupted``: compare stops, and a rerun resumes the run)."""
        run, log = job.run, job.log
        log.close()
        run.record["process_s"] = run.record.get("process_s", 0.0) + time.monotonic() - job.started
        code = job.proc.returncode
        self.pending.discard(run.name)
        if runs.stopped_by_signal(code):  # not by compare: someone stopped or killed the fit
            run.record.setdefault("stops", []).append({"signal": None, "exit": code})
            self.write_record(run)
            raise Interrupted(job, code)
        where = f"{job.index}/{len(self.runs)} {run.name}"
        if code != 0:
            error, last = self.fit_output(run)
            return self.fail(run, where, runs.failure(error, last, code))
        try:
            result = stats.read_result(self.logs(run), self.checkpoints(run) / "last.ckpt", run.record["plan"]["steps"])
        except UserError as e:  # it ended before its budget, and said nothing
            return self.fail(run, where, str(e))
        if not math.isfinite(result["final_val_loss"]):
            return self.fail(run, where, f"diverged: the final validation loss is {result['final_val_loss']}")
        run.record.update(status="done", result=result)
        self.write_record(run)
        self.done_now.append(run)
        lines.say(f"compare {self.name}", f"done {where}", f"final val loss {result['final_val_loss']:.4f}",
                  f"{result['steps']} steps", f"trained {lines.duration(result['train_s'])}", self.eta())

    def fail(self, run: runs.Run, where: str, why: str) -> None:
        run.record.update(status="failed", failure=why)
        self.write_record(run)
        lines.say(f"compare {self.name}", f"failed {where}", why, f"its output: {self.folder / 'logs' / run.name}.log",
                  self.eta())

    def fit_output(self, run: runs.Run) -> tuple[str | None, str]:
        """(the last ``gptnano: error:`` line of a fit's latest output, without its prefix, or None; its last line)."""
        try:
            text = (self.folder / "logs" / f"{run.name}.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None, "no output"
        latest = text.rsplit("\n$ gptnano fit ", 1)[-1].strip().splitlines() or ["no output"]
        found = [line for line in latest if line.startswith("gptnano: error:")]
        error = found[-1].removeprefix("gptnano: error: ").strip()[:300] if found else None
        return error, latest[-1].strip()[:300]

    def eta(self, elapsed: float = 0.0) -> str:
        """``ETA 12m30s``: the runs left at the pace of those this command finished (process time
        per FLOP; per run for wall-time budgets), less what the current run has done."""
        left = [r for r in self.runs if r.name in self.pending]
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
        """Train every run not done yet (nor failed, unless --retry_failed), K at a time. A stop
        signal to compare, or to one of its fits, stops every fit after its step (last.ckpt saved)
        and exits as a shell reports the signal: the runs resume on a rerun."""
        failed = sum(r.failed for r in self.runs)
        todo = [(i, r) for i, r in enumerate(self.runs, 1) if not r.done and (self.args.retry_failed or not r.failed)]
        started = sum(1 for _, r in todo if r.record and not r.failed)
        machine = " (wall time: machine-dependent)" if self.budget.machine_dependent else ""
        kept = f"{failed} failed" + ("" if self.args.retry_failed else " (kept: --retry_failed tries them again)")
        lines.say(f"compare {self.name}",
                  f"{len(self.points)} entries x {self.args.seeds} seeds = {len(self.runs)} runs",
                  f"{sum(r.done for r in self.runs)} done", kept if failed else "",
                  f"{started} to resume" if started else "",
                  f"budget {self.budget.text}{machine}", f"output of each fit in {self.folder / 'logs'}")
        self.pending = {r.name for _, r in todo}
        free, running = list(range(self.args.parallel)), {}
        previous = {}
        try:
            for number in STOP_SIGNALS:
                with contextlib.suppress(ValueError):  # (only the main thread may; compare's is)
                    previous[number] = signal.signal(number, _raise_stopped)
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
        except (KeyboardInterrupt, Stopped, Interrupted) as e:
            number = e.signum if isinstance(e, Stopped) else signal.SIGINT if isinstance(e, KeyboardInterrupt) else None
            self.stop(running.values(), signal.SIGTERM if number in (None, signal.SIGINT) else number)
            if isinstance(e, Interrupted):
                what = f"run {e.job.index}/{len(self.runs)} {e.job.run.name} was stopped by a signal (exit {e.code})"
            else:
                names = ", ".join(f"{j.index}/{len(self.runs)} {j.run.name}" for j in running.values())
                how = "Ctrl-C" if number == signal.SIGINT else signal.Signals(number).name
                what = f"stopped by {how} during run {names}" if names else f"stopped by {how}"
            lines.say(f"compare {self.name}", what, "run the same command again to resume")
            raise SystemExit(128 + number if number else e.status) from None
        except BaseException:
            self.stop(running.values(), signal.SIGTERM)
            raise
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def stop(self, jobs, number: int) -> None:
        """Ask each fit to stop with signal ``number`` (it ends its step, saves last.ckpt and exits) and wait."""
        for job in jobs:
            if job.proc.poll() is None:
                job.proc.send_signal(number)
        for job in jobs:
            try:
                job.proc.wait()
            except (KeyboardInterrupt, Stopped):  # a second Ctrl-C: stop waiting for the checkpoint
                job.proc.kill()
                job.proc.wait()
            job.run.record["process_s"] = job.run.record.get("process_s", 0.0) + time.monotonic() - job.started
            job.run.record.setdefault("stops", []).append({"signal": signal.Signals(number).name,
                                                           "exit": job.proc.returncode})
            self.write_record(job.run)
            job.log.close()

    # ----- outputs ---------------------------------------------------------------------
    def dry_run(self) -> None:
        cols = ["entry", "params", "FLOPs/token", "tokens/step", "steps", "validate every", "warmup", "tokens", "FLOPs",
                "runs"]

        def rows():  # one at a time: under a wall-time budget each entry's plan needs a probe
            for p in self.points:
                plan = self.plans.get(p.label) or self.plan_point(p, self.probe(p, 0))
                seeds = [r for r in self.runs if r.point is p]
                failed = sum(r.failed for r in seeds)
                state = f"{sum(r.done for r in seeds)}/{len(seeds)} done" + (f", {failed} failed" if failed else "")
                yield dict(zip(cols, [p.label, p.facts["params"], f"{p.facts['flops_per_token']:.4g}",
                                      plan.tokens_per_step, plan.steps, plan.val_every, plan.warmup, plan.tokens,
                                      f"{plan.flops:.4g}", state]))

        for line in markdown_table(rows(), cols):
            print(line)
        if self.budget.machine_dependent:
            print("\nSteps of a wall-time budget come from a probe of real steps: these from one just now; "
                  "each run is probed again just before it starts, and plans its steps again from its own pace "
                  "while it trains.")

    def report(self) -> list[Path]:
        """Write results.md, results.json, results.png (and results_scaling.png over a grid of sizes, or
        entries of different FLOPs): the entries whose every seed finished ranked, the failed runs below."""
        from gptnano.hardware import machine_info, machine_line

        finished, failed = [r for r in self.runs if r.done], [r for r in self.runs if r.failed]

        def entry(p: runs.Point) -> dict | None:  # over the seeds it finished
            mine = [r.record for r in finished if r.point is p]
            return {**stats.entry_stats(mine), "config": p.name, "grid": p.grid} if mine else None

        broken = {r.point.label for r in failed}
        entries = {p.label: e for p in self.points if p.label not in broken and (e := entry(p))}
        not_ranked = {p.label: {"config": p.name, "grid": p.grid, "seeds": self.args.seeds,
                                "finished": entry(p),
                                "failures": [{"run": r.name, "seed": r.seed, "failure": outputs.portable(r.record["failure"])}
                                             for r in failed if r.point is p]}
                      for p in self.points if p.label in broken}
        warnings = []
        if self.budget.machine_dependent:
            for r in finished:
                off = r.record["result"]["train_s"] / self.budget.amount - 1
                if abs(off) > 0.05:
                    warnings.append(f"{r.name} trained {r.record['result']['train_s']:.0f} s, {100 * off:+.0f} % "
                                    f"off its {self.budget.text} budget")
        machine = machine_info()
        texts = [{"file": Path(outputs.portable(t)).name, "sha256": sha} for t, sha in
                 sorted({(p.facts["text"], p.facts["text_sha256"]) for p in self.points})]
        report = {"name": self.name, "command": [outputs.portable(a) for a in ["gptnano", "compare", *self.argv]],
                  "budget_text": self.budget.text, "budget": self.budget.describe(), "budget_kind": self.budget.kind,
                  "budget_amount": self.budget.amount,
                  "seeds": self.args.seeds, "validations": self.args.validations,
                  "text": ", ".join(t["file"] for t in texts), "texts": texts,
                  "precision": ", ".join(sorted({r.record["precision"] for r in finished})),
                  "machine": machine, "machine_line": machine_line(machine), "entries": entries,
                  "ranking": [{"entry": label, "vs_above": verdict} for label, _, verdict in stats.ranking(entries)],
                  "not_ranked": not_ranked, "iso_budget": stats.iso_budget(entries),
                  "warnings": warnings, "runs": [outputs.portable_record(r.record) for r in self.runs
                                                 if r.done or r.failed]}
        md = atomic_write(self.folder / "results.md", outputs.markdown(report))
        js = outputs.write_json(self.folder / "results.json", report)
        written = [md, js]
        pictures = [("results.png", lambda out: outputs.plot(report, report["runs"], out))]
        if outputs.wants_scaling(report):
            pictures.append(("results_scaling.png", lambda out: outputs.plot_scaling(report, out)))
        for name, draw in pictures:
            if finished and draw(self.folder / name):
                written.append(self.folder / name)
            elif finished:
                lines.say(f"{name} not drawn: plotting needs matplotlib (pip install 'gptnano[plot]')")
        print(outputs.markdown(report))
        return written

    @property
    def failures(self) -> list[runs.Run]:
        return [r for r in self.runs if r.failed]

    def write_command(self) -> None:
        from gptnano.hardware import FAST_BF16_ENV

        atomic_write(self.folder / "compare.json", json.dumps(
            {"command": ["gptnano", "compare", *self.argv], "budget": self.budget.text, "seeds": self.args.seeds,
             "validations": self.args.validations, "precisions": self.precisions,
             "fast_bf16": self.env.get(FAST_BF16_ENV), "entries": [p.label for p in self.points],
             "runs": {r.name: r.hash for r in self.runs}}, indent=1) + "\n")

