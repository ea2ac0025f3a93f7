"""What this machine does fast, decided at run time, never pinned in a config.

Three choices follow from it: the precision a run trains in (``resolve_precision``),
the dtype of Muon's orthogonalisation (``fast_dtype``), and the peak FLOP/s that
MFU is measured against (``peak_flops``). The one question behind the first two is
whether bf16 matrix products are really faster than fp32 here:

* CPU: measured, in ~0.1 s, on a product shaped like the models' own. A CPU with
  native bf16 (AVX512-BF16, AMX) runs them ~2x fp32; one without (AVX2 only, many
  laptops) emulates them ~75x *slower*, so the answer decides between a fast run
  and a disaster. ``GPTNANO_FAST_BF16=1|0`` skips the CPU measurement (the CLI sets
  it for the DDP processes it launches, so every rank makes the same choice).
* CUDA: bf16 where the GPU has it natively (Ampere and later), else fp16 products.
* MPS: fp32 (see ``resolve_precision``).
"""

import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from gptnano.errors import UserError

FAST_BF16_ENV = "GPTNANO_FAST_BF16"
# bf16 products must beat fp32 by this much to pay for the casts that mixed
# precision adds around them (measured: 1.8-2.3x on an AVX512-BF16 EPYC, 0.01x on AVX2).
MIN_SPEEDUP = 1.25
PROBE_SHAPE = (256, 128, 512)  # (tokens, n_embd, 4 * n_embd): one of the CPU models' MLP products


class Verdict(NamedTuple):
    fast: bool  # bf16 products are clearly faster than fp32 on this device
    why: str  # one phrase for the log line, with the numbers behind it


def _operands(shape, dtypes, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    # A private generator: a probe must not move the seeded random stream a run initialises from.
    g = torch.Generator().manual_seed(0)
    m, k, n = shape
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    return [(a.to(device, dtype), b.to(device, dtype)) for dtype in dtypes]


def device_sync(device: str) -> Callable[[], None]:
    """What waits until ``device``'s queued work is done (a GPU runs it asynchronously, so a
    time taken without waiting is the time to queue it); nothing on the CPU."""
    if device == "cuda":
        return torch.cuda.synchronize
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def _best_times(pairs, rounds: int, seconds: float, device: str = "cpu") -> list[float]:
    """Fastest time of ``a @ b`` for each pair, the pairs taking turns (so a moment when the
    machine is busy slows them alike), for at least ``rounds`` rounds and ``seconds``."""
    sync = device_sync(device)
    for a, b in pairs:
        a @ b  # warm-up: kernel selection, first-touch allocation
    best, done, end = [float("inf")] * len(pairs), 0, time.perf_counter() + seconds
    while done < rounds or time.perf_counter() < end:
        for i, (a, b) in enumerate(pairs):
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            best[i] = min(best[i], time.perf_counter() - t)
        done += 1
    return best


def product_rate(dtype: torch.dtype, shape=PROBE_SHAPE, device: str = "cpu", seconds: float = 0.03) -> float:
    """Best FLOP/s of one product ``[m, k] @ [k, n]`` over about ``seconds`` (at least two timed runs)."""
    (best,) = _best_times(_operands(shape, [dtype], device), 2, seconds, device)
    return 2 * shape[0] * shape[1] * shape[2] / best


def compare_bf16_fp32(shape=PROBE_SHAPE) -> tuple[float, float]:
    """FLOP/s of bf16 and of fp32 products of one shape on one core, timed in turns, best
    of each. One thread: the ratio is a property of the core, and a multi-threaded product
    stalls whenever another process holds one of the cores, which would decide at random."""
    flops = 2 * shape[0] * shape[1] * shape[2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, bf16 = _best_times(_operands(shape, [torch.float32, torch.bfloat16]), rounds=3, seconds=0.05)
    finally:
        torch.set_num_threads(threads)
    return flops / bf16, flops / fp32


@functools.cache
def bf16_verdict(device_type: str = "cpu") -> Verdict:
    """Whether bf16 matrix products are fast on ``device_type`` ("cpu", "cuda", "mps")."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        fast = major >= 8  # Ampere and later have bf16 tensor cores; before, bf16 is emulated
        return Verdict(fast, f"compute capability {major}.{minor}: {'native' if fast else 'no native'} bf16")
    if device_type != "cpu":
        return Verdict(False, f"bf16 products are not measured on {device_type}")
    forced = os.environ.get(FAST_BF16_ENV)
    if forced in ("0", "1"):
        return Verdict(forced == "1", f"{FAST_BF16_ENV}={forced}")
    bf16, fp32 = compare_bf16_fp32()
    rates = f"{gflops(bf16)} GFLOP/s in bf16 vs {gflops(fp32)} in fp32 on one core"
    if bf16 >= MIN_SPEEDUP * fp32:
        return Verdict(True, f"bf16 products are {bf16 / fp32:.1f}x fp32 on this CPU: {rates}")
    return Verdict(False, f"this CPU has no fast bf16: {rates}")


def time_steps(step: Callable[[], object], *, sync: Callable[[], None] | None = None, warmup: int = 1,
               min_steps: int = 2, max_steps: int = 20, seconds: float = 1.0,
               stop: Callable[[list[float]], bool] | None = None) -> list[float]:
    """Seconds of each of a few real steps (a training step, a matrix product): the one way
    gptnano times steps, shared by the device choice and ``gptnano compare``'s wall-time budget.

    ``warmup`` untimed calls first (first-call costs: allocation, kernel selection), then timed
    calls, each ended by ``sync()`` (a GPU's queue must drain for its time to be real), until
    ``max_steps`` steps or ``seconds`` of timed work, but at least ``min_steps``; ``stop(times)``,
    asked after each timed step, may end it sooner (e.g. this side is already clearly slower).
    Returns the timed steps' seconds, in order: take their median, not their mean (a busy
    moment of the machine slows one step, not the rate)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    while len(times) < max_steps and (len(times) < min_steps or sum(times) < seconds):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        if len(times) >= min_steps and stop is not None and stop(times):
            break
    return times


def gflops(rate: float) -> str:
    return f"{rate / 1e9:.1f}" if rate < 1e10 else f"{rate / 1e9:.0f}"


def fast_dtype(device_type: str) -> torch.dtype:
    """bf16 where bf16 products are fast on the device, else fp32 (e.g. for Muon's Newton-Schulz)."""
    return torch.bfloat16 if bf16_verdict(device_type).fast else torch.float32


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def device_type(accelerator) -> str:
    """The device type ("cpu", "cuda", "mps") a Trainer given ``accelerator`` will train on,
    following Lightning's rules: "auto" prefers CUDA, then MPS; "gpu" means CUDA or MPS."""
    name = accelerator.lower() if isinstance(accelerator, str) else "auto"  # an Accelerator object: ask torch
    if name in ("cuda", "gpu") and not torch.cuda.is_available() and not (name == "gpu" and _mps_available()):
        raise UserError(f"--trainer.accelerator {accelerator}: no CUDA GPU is available to this process")
    if name in ("cpu", "cuda", "mps"):
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if _mps_available() else "cpu"


def resolve_precision(device: str) -> tuple[str, str]:
    """The Trainer precision for a run on ``device`` when the user gave none, and why.

    CPU: bf16-mixed only where bf16 products are really faster (measured), else 32-true.
    CUDA: bf16-mixed on GPUs with native bf16, else 16-mixed (fp16 products with loss scaling).
    MPS: 32-true. PyTorch's MPS autocast and gradient scaling are younger than CUDA's and
    depend on the macOS version (bf16 needs macOS 14); fp32 is right on every Apple GPU,
    and ``--trainer.precision 16-mixed`` is there for whoever measures it faster.
    """
    if device == "mps":
        return "32-true", "MPS: fp32 is the precision every Apple GPU and macOS version runs correctly"
    verdict = bf16_verdict(device)
    if device == "cuda":
        return ("bf16-mixed" if verdict.fast else "16-mixed"), verdict.why
    return ("bf16-mixed" if verdict.fast else "32-true"), verdict.why


def resumed_arithmetic(device: str, checkpoint: dict | None) -> dict:
    """What a checkpoint's run trained in (``precision``, ``muon_dtype``), if it trained on this
    kind of device; empty otherwise (trained elsewhere: choose for this device)."""
    kept = (checkpoint or {}).get("gptnano") or {}
    return kept if kept.get("device") == device else {}


def choose_precision(device: str, resumed: dict | None = None) -> tuple[str, str]:
    """The precision of a run when none was given, and why: a resumed run keeps its own (so a
    resume stays bit-exact), anything else gets what ``device`` does fast (``resolve_precision``)."""
    if (resumed or {}).get("precision"):
        return resumed["precision"], "the precision the resumed run trained in"
    return resolve_precision(device)


def precision_dtypes(precision: str) -> list[torch.dtype]:
    """The dtypes a precision setting runs matrix products in (mixed: both)."""
    p = str(precision)
    if p.startswith("bf16"):
        return [torch.bfloat16] if "true" in p else [torch.bfloat16, torch.float32]
    if p.startswith("16"):
        return [torch.float16] if "true" in p else [torch.float16, torch.float32]
    return [torch.float32]


# Shapes of the CPU peak probe: square, and the thin shapes of the CPU models' products.
CPU_PEAK_SHAPES = [(512, 512, 512), (1024, 1024, 1024), (2048, 128, 512), (2048, 512, 128)]
GPU_PEAK_SHAPE = (8192, 8192, 8192)  # small products measure launch latency on a GPU, not throughput
# Apple GPUs: big enough to fill one (8-40 cores, a few TFLOP/s), small enough for the budget.
MPS_PEAK_SHAPES = [(2048, 2048, 2048), (4096, 4096, 4096)]


@functools.cache
def measured_peak(dtype: torch.dtype, device: str = "cpu", seconds: float = 0.2) -> float:
    """Best FLOP/s of a matrix product in ``dtype`` here, over several shapes. A shape whose
    single product would take longer than the budget (bf16 on a CPU without it) is skipped."""
    shapes = {"cuda": [GPU_PEAK_SHAPE], "mps": MPS_PEAK_SHAPES}.get(device, CPU_PEAK_SHAPES)
    best, budget = 0.0, seconds / len(shapes)
    for shape in shapes:
        flops = 2 * shape[0] * shape[1] * shape[2]
        if best and flops / best > budget:
            continue
        best = max(best, product_rate(dtype, shape, device, budget))
    return best


def peak_flops(device: torch.device | str, precision: str) -> tuple[float, str]:
    """The peak FLOP/s MFU is measured against, and where it comes from.

    On CUDA, Lightning's table of datasheet peaks where it knows the GPU; elsewhere (the
    CPU, an Apple GPU, a GPU it does not know) measured here with the largest products that
    fit a short budget. Mixed precision runs some products in fp32, so its peak is the faster
    of the two.
    """
    device = torch.device(device)
    dtypes = precision_dtypes(precision)
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        table = [get_available_flops(device, d) for d in dtypes]
        if all(table):
            return float(max(table)), f"{torch.cuda.get_device_name(device)} datasheet"
    if device.type not in ("cpu", "cuda", "mps"):
        return 0.0, f"not measured on {device.type}"
    return max(measured_peak(d, device.type) for d in dtypes), "measured here"


def cpu_model() -> str:
    """The CPU's marketing name (``lscpu``'s "Model name"), or what the platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Where a measurement was made, for every benchmark result and table."""
    verdict = bf16_verdict("cpu")
    info = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fast_bf16": verdict.fast,
        "bf16_probe": verdict.why,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: dict | None = None) -> str:
    """``machine_info`` as one line for a table's caption."""
    info = info or machine_info()
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{info['cpu']} ({info['cpu_capability']}, {'fast' if info['fast_bf16'] else 'no fast'} bf16: "
            f"{info['bf16_probe']}), {info['threads']} threads, torch {info['torch']}{gpu}")
