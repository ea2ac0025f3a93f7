"""The device a run uses when none is given (gptnano/devices.py): measured like the precision,
remembered, overridden by a flag, kept on resume where the machine has it. This machine has
no GPU: the accelerators here are stubs, a slow one (an Apple GPU under a small model) and a
fast one, whose steps only sleep. The per-user cache is a temporary folder (tests/conftest.py)."""

import json
import os
import time

import pytest
import torch

from gptnano import devices, files, hardware
from tests.helpers import TINY_GPT


def sleeper(seconds: float, calls: list | None = None):
    def step():
        if calls is not None:
            calls.append(seconds)
        time.sleep(seconds)
    return step


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """``machine(accelerator)``: this process sees that accelerator ("mps", "cuda" or None), its
    steps need no sync, and verdicts go to a fresh cache folder. Returns the folder."""
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(devices, "device_sync", lambda device: (lambda: None))  # no queue to wait for
    for kind in ("mps", "cuda"):  # their random streams, which a probe saves and restores
        state = {"value": torch.zeros(8, dtype=torch.uint8)}
        monkeypatch.setattr(getattr(torch, kind), "get_rng_state", lambda *a, state=state: state["value"].clone())
        monkeypatch.setattr(getattr(torch, kind), "set_rng_state",
                            lambda value, *a, state=state: state.__setitem__("value", value))

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3 (stub)")

    def install(accelerator):
        monkeypatch.setattr(devices, "accelerator_here", lambda: accelerator)
        return tmp_path / "cache"
    return install


def probe(rates: dict, calls: list):
    """A make_step whose steps on each device sleep 1/rate seconds (tokens_per_step=1 then gives rate)."""
    def make_step(device):
        calls.append(device)
        return sleeper(1 / rates[device])
    return make_step


def test_the_race_drops_a_clearly_slower_side_after_one_step(monkeypatch):
    timed = []
    real = devices.time_steps
    monkeypatch.setattr(devices, "time_steps", lambda step, **kw: timed.append(kw) or real(step, **kw))
    monkeypatch.setattr(devices, "device_sync", lambda device: (lambda: None))
    slow, fast = [], []
    times = devices.race({"mps": sleeper(0.05, slow), "cpu": sleeper(0.002, fast)}, seconds=5.0, enough=6)
    assert len(times["mps"]) == 1 and len(slow) == 2  # its warm-up and one timed step, then dropped
    assert len(times["cpu"]) == 1  # the race is over once one side is left
    assert timed and all(kw["max_steps"] == 1 for kw in timed)  # the one step-timing function, one step a turn
    close = devices.race({"mps": sleeper(0.012), "cpu": sleeper(0.008)}, seconds=5.0, enough=6)
    assert len(close["mps"]) == len(close["cpu"]) == 6  # neither clearly slower: a median of 6 each decides
    assert devices.faster(close, 1)[0] == "cpu"


@pytest.mark.parametrize("accelerator,rates,expected", [
    ("mps", {"mps": 50, "cpu": 500}, "cpu"),  # an Apple GPU 10x slower than the CPU for a small model
    ("cuda", {"cuda": 1000, "cpu": 20}, "cuda"),  # a real GPU
])
def test_the_faster_device_wins_and_is_remembered(machine, accelerator, rates, expected):
    folder = machine(accelerator)
    calls = []
    work = {"command": "fit", "net": "GPT", "batch": [24, 64]}
    choice = devices.choose(work, probe(rates, calls), tokens_per_step=1)
    assert choice.device == expected and sorted(calls) == sorted(rates)
    assert set(choice.rates) == set(rates) and choice.rates[expected] == max(choice.rates.values())
    line = devices.line(choice, "--trainer.accelerator")
    slower = next(d for d in rates if d != expected)
    assert line.startswith(f"gptnano: device {expected} (") and f" tok/s on {slower} vs " in line
    assert line.endswith(f" on {expected} for this model); --trainer.accelerator overrides")
    stored = json.loads((folder / devices.CACHE_FILE).read_text())
    assert [v["device"] for v in stored.values()] == [expected]

    again = devices.choose(work, probe(rates, calls), tokens_per_step=1)  # a second run: no probe
    assert again.device == expected and sorted(calls) == sorted(rates) and "measured before" in again.why
    other = devices.choose({**work, "batch": [64, 256]}, probe(rates, calls), tokens_per_step=1)
    assert other.device == expected and len(calls) == 4  # another model shape is measured again


def test_the_cache_is_keyed_by_the_machine_and_torch(machine, monkeypatch):
    machine("mps")
    work = {"command": "fit"}
    key = devices.cache_key(work)
    assert devices.cache_key(work) == key and devices.cache_key({"command": "generate"}) != key
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert devices.cache_key(work) != key
    assert devices.machine()["accelerator"].startswith("mps macOS")


def test_a_failing_accelerator_loses_and_says_why(machine):
    machine("mps")

    def make_step(device):
        if device == "mps":
            def fails():
                raise NotImplementedError("The operator 'aten::something' is not currently implemented for MPS")
            return fails
        return sleeper(0.001)

    choice = devices.choose({"command": "fit"}, make_step, 1)
    assert choice.device == "cpu" and choice.why.startswith("mps failed: The operator 'aten::something'")


def test_nothing_to_choose_without_an_accelerator(machine):
    machine(None)
    choice = devices.choose({}, lambda d: pytest.fail("measured"), 1)
    assert choice == devices.Choice("cpu", {}, "")


@pytest.mark.parametrize("trained_on,accelerator,expected,why", [
    ("mps", "mps", "mps", "the device the resumed run trained on"),
    ("cpu", "cuda", "cpu", "the device the resumed run trained on"),
    ("cuda", None, "cpu", "the run trained on cuda, which this machine does not have"),  # a GPU run on a laptop
])
def test_a_resumed_run_keeps_its_device_where_the_machine_has_it(machine, trained_on, accelerator, expected, why):
    machine(accelerator)
    choice = devices.choose({}, lambda d: pytest.fail("measured"), 1, resumed_on=trained_on)
    assert choice.device == expected and choice.why == why


def test_a_gpu_run_resumed_on_a_mac_measures_what_the_mac_has(machine):
    machine("mps")
    calls = []
    choice = devices.choose({}, probe({"mps": 50, "cpu": 500}, calls), 1, resumed_on="cuda")
    assert choice.device == "cpu" and sorted(calls) == ["cpu", "mps"]
    assert choice.why.startswith("the run trained on cuda, which this machine does not have; ")


def test_several_processes_or_devices_take_the_accelerator_unmeasured(machine, monkeypatch):
    machine("cuda")
    assert devices.choose({}, lambda d: pytest.fail("measured"), 1, one_device=False).device == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "4")  # started by torchrun: every process must decide alike
    choice = devices.choose({}, lambda d: pytest.fail("measured"), 1)
    assert choice.device == "cuda" and "several processes" in choice.why


def test_the_probe_leaves_the_seeded_random_stream_alone(machine):
    machine("mps")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    devices.choose({}, lambda device: (lambda: torch.rand(100)), 1, seconds=0.05)
    assert torch.equal(torch.rand(3), expected)


def test_the_cache_folder_follows_the_os(monkeypatch, tmp_path):
    monkeypatch.delenv(files.CACHE_ENV, raising=False)
    monkeypatch.setattr(files.Path, "home", lambda: tmp_path)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for platform, expected in [("linux", tmp_path / ".cache" / "gptnano"),
                               ("darwin", tmp_path / "Library" / "Caches" / "gptnano")]:
        monkeypatch.setattr(files.sys, "platform", platform)
        assert files.cache_folder() == expected
    monkeypatch.setattr(files.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert files.cache_folder() == tmp_path / "Local" / "gptnano" / "Cache"
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "mine"))
    assert files.cache_folder() == tmp_path / "mine"


def test_mfu_on_mps_is_measured_against_a_measured_peak(monkeypatch):
    hardware.measured_peak.cache_clear()
    monkeypatch.setattr(hardware, "measured_peak", lambda dtype, device="cpu": {"mps": 3.5e12}[device])
    assert hardware.peak_flops("mps", "32-true") == (3.5e12, "measured here")
    assert hardware.device_sync("mps") is torch.mps.synchronize and hardware.device_sync("cuda") is torch.cuda.synchronize


# ----- through the CLI: the probe times real training steps of the configured model -------------

def slow_off_the_cpu(make_step, built: list):
    """``make_step(..., device)`` as the probes call it, for a machine whose accelerator is slow:
    every device gets the real CPU step, the accelerator's plus 50 ms; ``built`` collects the
    devices asked for."""

    def slowed(*args):
        *rest, device = args
        built.append(device)
        step = make_step(*rest, "cpu")
        return step if device == "cpu" else (lambda: (step(), time.sleep(0.05)))

    return slowed


@pytest.fixture
def slow_mps(machine, monkeypatch):
    """An Apple GPU that trains the tiny GPT slowly: its side of the probe is the real CPU step
    plus 50 ms. Returns the list of devices the probe built steps for."""
    import gptnano.cli.lightning as cli

    machine("mps")
    built = []
    monkeypatch.setattr(cli, "probe_step", slow_off_the_cpu(cli.probe_step, built))
    return built


def test_fit_times_the_model_picks_the_cpu_and_remembers(slow_mps, text_file, tmp_path, monkeypatch, capsys):
    from gptnano.cli.lightning import GPTNanoCLI

    monkeypatch.chdir(tmp_path)
    args = [*TINY_GPT, "--data.path", str(text_file), "--trainer.precision", "32-true"]
    cli = GPTNanoCLI(args=args, run=False)
    assert type(cli.trainer.accelerator).__name__ == "CPUAccelerator" and slow_mps == ["mps", "cpu"]
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("gptnano: device"))
    assert line.startswith("gptnano: device cpu (") and " tok/s on mps vs " in line, line
    assert os.environ[devices.DEVICE_ENV] == "cpu"  # what the DDP processes started from this one take

    del os.environ[devices.DEVICE_ENV]
    start = time.perf_counter()
    GPTNanoCLI(args=args, run=False)  # a second run on this machine: remembered, not measured
    assert slow_mps == ["mps", "cpu"] and "measured before" in capsys.readouterr().err
    assert time.perf_counter() - start < 30  # (the figure for the cached decision alone is in the report)

    GPTNanoCLI(args=[*args, "--trainer.accelerator", "cpu"], run=False)  # an explicit flag always wins
    assert slow_mps == ["mps", "cpu"] and "gptnano: device" not in capsys.readouterr().err


def test_generate_auto_follows_the_same_rule(machine, tmp_path, monkeypatch, capsys):
    from gptnano.cli import generate
    from gptnano.models import GPT

    machine("mps")
    built = []
    monkeypatch.setattr(generate, "sampling_step", slow_off_the_cpu(generate.sampling_step, built))
    net = GPT(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=16)
    assert generate.pick_device("auto", net) == torch.device("cpu") and built == ["mps", "cpu"]
    err = capsys.readouterr().err
    assert err.startswith("gptnano: device cpu (") and err.rstrip().endswith("; --device overrides")
    assert generate.pick_device("auto", net) == torch.device("cpu") and built == ["mps", "cpu"]  # remembered
    assert generate.pick_device("cpu", net) == torch.device("cpu")


def test_a_gpu_run_resumes_on_a_machine_without_one(gptnano, text_file, tmp_path):
    """A run that trained on CUDA (its checkpoint says so) goes on here, on the CPU, in the CPU's
    precision, and one line says why; the GPU's loss-scaler state is left unused."""
    args = ["fit", *TINY_GPT, "--model.optimizer", "muon", "--data.path", str(text_file),
            "--trainer.val_check_interval", "100"]
    assert gptnano([*args, "--trainer.max_steps", "3"], tmp_path).returncode == 0
    last = tmp_path / "checkpoints" / "gpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["gptnano"] = {"precision": "16-mixed", "device": "cuda", "muon_dtype": "bfloat16"}
    ckpt["MixedPrecision"] = {"scale": torch.tensor(65536.0), "growth_tracker": torch.tensor(0)}
    torch.save(ckpt, last)
    ran = gptnano([*args, "--trainer.max_steps", "5", "--ckpt_path", "last"], tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ("gptnano: device cpu (the run trained on cuda, which this machine does not have); "
            "--trainer.accelerator overrides") in ran.stderr.splitlines()
    assert "the precision the resumed run trained in" not in ran.stderr  # chosen for this CPU instead
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 5 and resumed["gptnano"]["device"] == "cpu"
    assert resumed["gptnano"]["precision"] in ("bf16-mixed", "32-true")
