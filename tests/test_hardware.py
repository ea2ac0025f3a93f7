"""Defaults chosen by what the hardware does fast: the precision resolver, the dtype of
Muon's orthogonalisation and the MFU peak, with the measurements stubbed (no timings)."""

from pathlib import Path

import pytest
import torch
import yaml

from gptnano import hardware
from gptnano.train.callbacks import Throughput

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(monkeypatch):
    """No cached verdict and no override from the environment; returns a stub installer."""
    monkeypatch.delenv(hardware.FAST_BF16_ENV, raising=False)
    cached = (hardware.bf16_verdict, hardware.measured_peak)
    for f in cached:
        f.cache_clear()

    def rates(fp32: float, bf16: float):
        monkeypatch.setattr(hardware, "compare_bf16_fp32", lambda *a, **k: (bf16, fp32))

    yield rates
    for f in cached:
        f.cache_clear()


def test_cpu_with_fast_bf16_trains_in_bf16_mixed(fresh):
    fresh(fp32=186e9, bf16=343e9)  # an AVX512-BF16 EPYC, measured
    precision, why = hardware.resolve_precision("cpu")
    assert precision == "bf16-mixed" and "1.8x" in why and "343" in why
    assert hardware.fast_dtype("cpu") == torch.bfloat16


def test_cpu_without_fast_bf16_trains_in_fp32(fresh):
    fresh(fp32=142e9, bf16=1.9e9)  # an AVX2-only Zen 3, as the issue measured it
    precision, why = hardware.resolve_precision("cpu")
    assert precision == "32-true" and why == "this CPU has no fast bf16: 1.9 GFLOP/s in bf16 vs 142 in fp32 on one core"
    assert hardware.fast_dtype("cpu") == torch.float32


def test_bf16_must_be_clearly_faster_to_be_chosen(fresh):
    fresh(fp32=100e9, bf16=120e9)  # faster, but not enough to pay for mixed precision's casts
    assert hardware.resolve_precision("cpu")[0] == "32-true"


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"), ((7, 5), "16-mixed")])
def test_cuda_takes_bf16_where_the_gpu_has_it_else_fp16(fresh, monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert hardware.resolve_precision("cuda")[0] == expected
    assert hardware.fast_dtype("cuda") == (torch.bfloat16 if expected == "bf16-mixed" else torch.float32)


def test_the_cpu_override_leaves_gpus_alone(fresh, monkeypatch):
    monkeypatch.setenv(hardware.FAST_BF16_ENV, "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))  # a V100: no bf16
    assert hardware.resolve_precision("cuda")[0] == "16-mixed"


def test_asking_for_a_gpu_without_one_is_one_line(monkeypatch):
    from gptnano.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        hardware.device_type("cuda")


def test_mps_trains_in_fp32(fresh):
    assert hardware.resolve_precision("mps")[0] == "32-true"


@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_environment_override_skips_the_measurement(fresh, monkeypatch, forced):
    monkeypatch.setattr(hardware, "compare_bf16_fp32", lambda *a, **k: pytest.fail("measured despite the override"))
    monkeypatch.setenv(hardware.FAST_BF16_ENV, forced)
    assert hardware.resolve_precision("cpu")[0] == ("bf16-mixed" if forced == "1" else "32-true")


def test_the_cli_resolves_and_an_explicit_flag_wins(fresh, text_file, tmp_path, monkeypatch):
    from gptnano.cli.lightning import GPTNanoCLI

    monkeypatch.chdir(tmp_path)
    fresh(fp32=142e9, bf16=1.9e9)
    args = ["--config", str(ROOT / "configs" / "gpt.yaml"), "--data.path", str(text_file)]
    assert GPTNanoCLI(args=args, run=False).trainer.precision == "32-true"
    hardware.bf16_verdict.cache_clear()
    monkeypatch.delenv(hardware.FAST_BF16_ENV)  # the CLI set it for the processes it would launch
    fresh(fp32=186e9, bf16=343e9)
    assert GPTNanoCLI(args=args, run=False).trainer.precision == "bf16-mixed"
    explicit = GPTNanoCLI(args=[*args, "--trainer.precision", "32-true"], run=False)
    assert explicit.trainer.precision == "32-true"


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/**/*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_config_pins_a_precision(path):
    """A precision in a config would be right for one kind of machine and wrong for another."""
    assert "precision" not in (yaml.safe_load(path.read_text()).get("trainer") or {})


def test_orthogonalisation_runs_in_the_chosen_dtype(monkeypatch):
    from gptnano.train.optim import MuonAdamW

    seen = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: seen.append(a[1].dtype) or real(*a, **k))
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.randn(8, 16))
        p.grad = torch.randn(8, 16)
        MuonAdamW([{"params": [p], "muon": True}], ns_dtype=dtype).step()
        assert seen and set(seen) == {dtype}
        seen.clear()


def test_mixed_precision_peak_is_the_faster_of_its_dtypes(fresh, monkeypatch):
    monkeypatch.setattr(hardware, "measured_peak", lambda dtype, device="cpu": {torch.float32: 200e9, torch.bfloat16: 2e9}[dtype])
    assert hardware.peak_flops("cpu", "bf16-mixed")[0] == 200e9  # bf16 forced on a CPU without it
    assert hardware.peak_flops("cpu", "32-true")[0] == 200e9
    assert hardware.precision_dtypes("bf16-true") == [torch.bfloat16]


def test_mfu_never_reads_above_one():
    meter = Throughput(peak_flops=1e9)
    assert meter.mfu(0.5e9) == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="above the peak"):
        assert meter.mfu(3e9) == 1.0  # a peak below what training reaches was a wrong peak
    assert meter.mfu(1.5e9) == pytest.approx(0.5)


def test_probes_leave_the_seeded_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    hardware.compare_bf16_fp32()
    hardware.product_rate(torch.float32)
    assert torch.equal(torch.rand(3), expected)


def test_peak_probe_skips_products_that_would_take_too_long(fresh, monkeypatch):
    """bf16 on a CPU without it runs at ~2 GFLOP/s: a 1024^3 product would take a second."""
    shapes = []

    def rate(dtype, shape, device="cpu", seconds=0.0):
        shapes.append(shape)
        return 2e9

    monkeypatch.setattr(hardware, "product_rate", rate)
    assert hardware.measured_peak(torch.bfloat16) == 2e9
    assert shapes == [(512, 512, 512)]  # every larger product is skipped
