"""Which device a run uses when none is given: measured, like the precision.

An accelerator is not always faster. Small models like gptnano's train several times
slower on an Apple GPU (MPS) than on the same Mac's CPU: each step is hundreds of small
kernels, and launching them costs more than their arithmetic. Lightning's
``accelerator="auto"`` takes the accelerator whatever the model's size. Here, when an
accelerator is present and none was asked for, a few real steps of the configured model
run on it and on the CPU (each in the precision it would use, eager), taking turns, and
the faster wins; a side clearly slower is dropped after its first timed step, so the
probe stays within a few seconds. The verdict is remembered per machine, torch version
and model shape in a per-user cache folder (``GPTNANO_CACHE_DIR`` overrides it), so
later runs do not probe again. No Lightning here: ``gptnano generate`` uses it too.
"""

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch

from gptnano import lines
from gptnano.errors import UserError
from gptnano.files import atomic_write, cache_folder
from gptnano.hardware import _mps_available, cpu_model, device_sync, time_steps
from gptnano.numbers import median

DEVICE_ENV = "GPTNANO_DEVICE"  # a verdict handed down to the processes a run launches (DDP ranks)
CACHE_FILE = "devices.json"
PROBE_SECONDS = 2.5  # of timed steps, both sides together; the sum stays near 3 s with the warm-ups
CLEARLY_SLOWER = 2.0  # a side whose best step takes this many times the other's best is dropped at once
ENOUGH_STEPS = 8  # per side: a median of this many steps decides


class Choice(NamedTuple):
    device: str  # "cpu", "cuda" or "mps"
    rates: dict  # device -> tokens per second measured (empty when nothing was measured)
    why: str  # one phrase for the line


def accelerator_here() -> str | None:
    """The accelerator Lightning's "auto" would take ("cuda", then "mps"), or None."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if _mps_available() else None


def available(device: str) -> bool:
    """Whether this machine has a device of this kind."""
    return device == "cpu" or accelerator_here() == device or (device == "mps" and _mps_available())


def several_processes() -> bool:
    """Whether this process is one of several started together from outside (torchrun, SLURM,
    mpirun): they cannot all measure and be sure to agree, so they do not measure."""
    world = max(int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    return world > 1


# ----- the measurement -------------------------------------------------------------------

@contextmanager
def own_random_streams(devices: list[str]):
    """Leave the random streams of the CPU and of ``devices`` as they were: a probe must not
    move the seeded stream a run initialises from (dropout in a probe step draws from it)."""
    saved = {"cpu": torch.get_rng_state()}
    if "cuda" in devices:
        saved["cuda"] = torch.cuda.get_rng_state()
    if "mps" in devices:
        saved["mps"] = torch.mps.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"])
        if "mps" in saved:
            torch.mps.set_rng_state(saved["mps"])


def race(steps: dict[str, Callable[[], object]], *, seconds: float = PROBE_SECONDS, clearly: float = CLEARLY_SLOWER,
         enough: int = ENOUGH_STEPS, warm: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """Seconds of each timed step of every side of ``steps`` (device -> one step of the same work).

    The sides take turns, one step each (a busy moment of the machine slows both alike), each
    timed by ``hardware.time_steps`` after one untimed warm-up step (kernel selection, first
    allocations; none for the sides in ``warm``, which already took one). A side whose best
    step takes more than ``clearly`` times the best of another is dropped at once; the others
    go on until each has ``enough`` steps or ``seconds`` have passed."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    racing, start = list(steps), time.perf_counter()
    while len(racing) > 1:
        for name in racing:
            warmup = 0 if times[name] or name in warm else 1
            times[name] += time_steps(steps[name], sync=device_sync(name), warmup=warmup, min_steps=1, max_steps=1,
                                      seconds=0.0)
        best = min(min(times[name]) for name in racing)
        racing = [name for name in racing if min(times[name]) <= clearly * best]
        if all(len(times[name]) >= enough for name in racing) or time.perf_counter() - start > seconds:
            break
    return times


def faster(times: dict[str, list[float]], tokens_per_step: int) -> tuple[str, dict[str, float]]:
    """The side with the shortest median step, and every side's tokens per second."""
    rates = {name: tokens_per_step / median(t) for name, t in times.items() if t}
    return max(rates, key=rates.get), rates


def measure(make_step: Callable[[str], Callable[[], object]], devices: list[str], tokens_per_step: int,
            **race_settings) -> tuple[str, dict[str, float], str]:
    """Race one step of the same work on each of ``devices``; returns (the faster, the rates,
    why another side could not run, or ""). A side that fails to run (an operation the
    accelerator lacks, no memory for the model) loses, with the reason in the line."""
    steps, failed, warm = {}, "", []
    with own_random_streams(devices):
        for device in devices:
            if device == "cpu":
                steps[device] = make_step(device)  # a failure here is a bug, not a verdict: let it show
                continue
            try:
                steps[device] = make_step(device)
                steps[device]()  # the warm-up step: an accelerator's failure shows here, before any timing
                device_sync(device)()
                warm.append(device)
            except Exception as e:  # noqa: BLE001 - whatever stops the accelerator, the CPU still runs
                failed = f"{device} failed: {(str(e).splitlines() or [type(e).__name__])[0][:60]}"
                steps.pop(device, None)
        if len(steps) == 1:
            return next(iter(steps)), {}, failed
        winner, rates = faster(race(steps, warm=tuple(warm), **race_settings), tokens_per_step)
    return winner, rates, failed


def rates_phrase(winner: str, rates: dict[str, float]) -> str:
    """``1,840 tok/s on mps vs 23,100 on cpu for this model`` (the others first, the winner last)."""
    order = sorted(rates, key=lambda d: d == winner)
    return " vs ".join(f"{rates[d]:,.0f}{' tok/s' if i == 0 else ''} on {d}" for i, d in enumerate(order)) + \
        " for this model"


# ----- the per-user memory of verdicts ---------------------------------------------------

def machine() -> dict:
    """What makes a verdict this machine's: host, CPU and threads, the accelerator, torch."""
    accelerator = accelerator_here()
    if accelerator == "cuda":
        accelerator = f"cuda {torch.cuda.get_device_name()}"
    elif accelerator == "mps":
        accelerator = f"mps macOS {platform.mac_ver()[0]}"
    return {"host": platform.node(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "accelerator": accelerator, "torch": torch.__version__}


def work_of(command: str, net, **settings) -> dict:
    """What runs, as ``choose`` keys its memory by: the command, the network's class and the shape
    of every parameter, and any other setting that changes the speed (batch, precision, ...)."""
    return {"command": command, "net": type(net).__name__,
            "parameters": [[n, list(p.shape)] for n, p in net.named_parameters()], **settings}


def cache_key(work: dict) -> str:
    """A short hash of the machine and of ``work`` (what runs: the command, the model's class
    and sizes, the batch, the precision asked for...): equal keys, the same verdict."""
    text = json.dumps({"machine": machine(), "work": work}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again, and rewrite it


def remembered(key: str) -> dict | None:
    """The verdict stored under ``key``, or None."""
    found = _read(cache_folder() / CACHE_FILE).get(key)
    return found if isinstance(found, dict) and found.get("device") in ("cpu", "cuda", "mps") else None


def remember(key: str, verdict: dict) -> None:
    """Store ``verdict`` under ``key``. Two runs storing at once may lose one verdict (it is
    measured again next time); a cache that cannot be written is only a cost, never an error."""
    path = cache_folder() / CACHE_FILE
    data = _read(path)
    data[key] = verdict
    try:
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
    except UserError:
        pass


# ----- the rule ------------------------------------------------------------------------------

def choose(work: dict, make_step: Callable[[str], Callable[[], object]], tokens_per_step: int, *,
           resumed_on: str | None = None, one_device: bool = True, **race_settings) -> Choice:
    """The device to run ``work`` on when none was asked for.

    Args:
        work: What runs, for the cache key (JSON-able: command, model class and sizes, batch...).
        make_step: ``make_step(device)`` returns one step of the work on that device (a real
            training step, a few generated tokens); called only when measuring.
        tokens_per_step: Tokens one step processes, for the rates.
        resumed_on: The device kind a resumed run trained on: kept if this machine has it.
        one_device: False when the run asked for several devices or machines: the accelerator
            then, as Lightning would (one CPU process is never the answer to a multi-GPU run).

    Rules, in order: no accelerator here: the CPU (``why`` empty unless a resumed run moved);
    a resumed run keeps its device kind where the machine has it; several processes started from outside or several devices
    asked for: the accelerator, unmeasured (every process decides alike); otherwise the
    faster by measurement, remembered per machine, torch version and ``work``.
    """
    accelerator = accelerator_here()
    moved = f"the run trained on {resumed_on}, which this machine does not have" if resumed_on else ""
    if accelerator is None and resumed_on in (None, "cpu"):
        return Choice("cpu", {}, "")  # nothing to choose between, nothing to say
    if resumed_on and available(resumed_on):
        return Choice(resumed_on, {}, "the device the resumed run trained on")
    if accelerator is None:
        return Choice("cpu", {}, moved)
    if several_processes():
        return Choice(accelerator, {}, _joined(moved, "one of several processes: each takes the accelerator unmeasured"))
    if not one_device:
        return Choice(accelerator, {}, _joined(moved, "several devices asked for"))
    key = cache_key(work)
    if (known := remembered(key)) is not None:
        rates = known.get("rates") or {}
        said = rates_phrase(known["device"], rates) if len(rates) > 1 else known.get("why", "")
        return Choice(known["device"], rates, _joined(moved, f"{said}, measured before"))
    device, rates, failed = measure(make_step, [accelerator, "cpu"], tokens_per_step, **race_settings)
    said = rates_phrase(device, rates) if rates else failed
    remember(key, {"device": device, "rates": rates, "why": said,
                   "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return Choice(device, rates, _joined(moved, said))


def _joined(*phrases: str) -> str:
    return "; ".join(p for p in phrases if p)


def line(choice: Choice, flag: str) -> str:
    """``gptnano: device cpu (1,840 tok/s on mps vs 23,100 on cpu for this model); --trainer.accelerator overrides``"""
    return lines.line(f"device {choice.device} ({choice.why}); {flag} overrides")
