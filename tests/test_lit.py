"""The LightningModule's own pieces: schedule, optimizer groups, clipping, metrics."""

import pytest
import torch
import torch.nn.functional as F

from gptnano.errors import UserError
from gptnano.models import GPT
from gptnano.models.gpt import CausalSelfAttention
from gptnano.train.guard import NonFiniteGuard
from gptnano.train.module import LitLM, muon_momentum_at, warmup_cosine, warmup_stable_decay
from gptnano.train.optim import MuonAdamW, muon_matrices


def test_warmup_then_cosine_to_min():
    f = lambda s: warmup_cosine(s, warmup_steps=10, decay_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.5 * 0.9)  # half way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 200))


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly():
    """The trapezoid: the cosine's warmup, the peak held, a straight line down to min_ratio over the
    last cooldown_fraction of the run, then flat."""
    f = lambda s, cooldown=0.2: warmup_stable_decay(s, 10, 110, 0.1, cooldown)  # noqa: E731
    assert [f(s) for s in range(10)] == [warmup_cosine(s, 10, 110, 0.1) for s in range(10)]
    assert all(f(s) == 1.0 for s in range(10, 88))  # cooldown from round(110 * 0.8) = 88
    assert f(99) == pytest.approx(1 - 11 / 22 * 0.9)  # half way down the line
    assert f(109) == pytest.approx(1 - 21 / 22 * 0.9) and f(110) == f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 200))
    assert f(50, cooldown=1.0) == pytest.approx(1 - 40 / 100 * 0.9)  # the whole run: never into the warmup
    assert f(109, cooldown=0.0) == 1.0 and f(110, cooldown=0.0) == pytest.approx(0.1)
    # max_steps -1 bounded by max_time alone: no end in sight, the plateau (and the cosine at its peak)
    assert warmup_stable_decay(10**6, 10, float("inf"), 0.1, 0.2) == warmup_cosine(10**6, 10, float("inf"), 0.1) == 1.0


def test_muon_momentum_warms_up_linearly_from_0_85():
    assert muon_momentum_at(0, 300, 0.95) == 0.85
    assert muon_momentum_at(150, 300, 0.95) == pytest.approx(0.90)
    assert muon_momentum_at(300, 300, 0.95) == muon_momentum_at(10**6, 300, 0.95) == 0.95
    assert muon_momentum_at(0, 0, 0.95) == 0.95  # no warmup: the momentum itself, from step 0


class _Trainer:
    max_steps, precision, strategy = 100, "bf16-mixed", None
    global_step, log_every_n_steps, optimizers, world_size, accumulate_grad_batches = 0, 50, [], 1, 1


def _lit(**kw):
    lit = LitLM(GPT(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8), vocab="abcdefghij", **kw)
    lit._trainer = _Trainer()
    return lit


def test_weight_decay_only_on_matrices_and_fused_adamw():
    lit = _lit(weight_decay=0.3)
    opt = lit.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(lit.parameters()))
    assert opt.defaults["fused"]


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    lit = _lit(optimizer="muon", muon_lr=0.05, learning_rate=1e-3, min_lr=1e-4, weight_decay=0.3)
    out = lit.configure_optimizers()
    opt, schedule = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, MuonAdamW)
    decay, no_decay, muon = opt.param_groups
    assert muon["muon"] and not decay["muon"] and not no_decay["muon"]
    assert {id(p) for p in muon["params"]} == {id(p) for p in muon_matrices(lit.net)}
    assert decay["weight_decay"] == 0.3 and id(lit.net.wte.weight) in {id(p) for p in decay["params"]}
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in lit.parameters())  # each parameter exactly once
    for _ in range(100):  # the schedule scales both learning rates alike, down to min_lr's ratio
        opt.step()  # no gradients: changes nothing, but steps in the order torch expects
        schedule.step()
    assert muon["lr"] == pytest.approx(0.05 * 0.1) and decay["lr"] == pytest.approx(1e-3 * 0.1)


def test_wsd_and_momentum_warmup_drive_the_optimizer_step_by_step():
    """With lr_schedule "wsd" and a momentum warmup, every step's learning rates and Muon momentum
    are the schedules' at that step, as Lightning steps the schedule (lr_scheduler_step)."""
    lit = _lit(optimizer="muon", lr_schedule="wsd", cooldown_fraction=0.5, warmup_steps=0, learning_rate=1e-3,
               min_lr=1e-4, muon_lr=0.05, muon_momentum=0.9, muon_momentum_warmup_steps=20)
    out = lit.configure_optimizers()
    opt, schedule = out["optimizer"], out["lr_scheduler"]["scheduler"]
    decay, muon = opt.param_groups[0], opt.param_groups[2]
    for step in range(100):
        assert muon["momentum"] == pytest.approx(muon_momentum_at(step, 20, 0.9))
        assert muon["lr"] == pytest.approx(0.05 * warmup_stable_decay(step, 0, 100, 0.1, 0.5))
        assert decay["lr"] == pytest.approx(1e-3 * warmup_stable_decay(step, 0, 100, 0.1, 0.5))
        opt.step()
        lit.lr_scheduler_step(schedule, None)
    assert muon["lr"] == pytest.approx(0.005) and muon["momentum"] == 0.9


def test_the_new_settings_at_their_defaults_leave_the_step_as_it_was():
    """lr_schedule "cosine" and no momentum warmup: the cosine multiplier itself and muon_momentum,
    the very floats, at every step (training stays bit-identical to before these settings)."""
    lit = _lit(optimizer="muon", warmup_steps=5, muon_momentum=0.93)
    out = lit.configure_optimizers()
    opt, schedule = out["optimizer"], out["lr_scheduler"]["scheduler"]
    for step in range(110):
        assert opt.param_groups[2]["momentum"] == 0.93
        assert opt.param_groups[2]["lr"] == 0.02 * warmup_cosine(step, 5, 100, 0.1)
        opt.step()
        lit.lr_scheduler_step(schedule, None)


def test_schedule_settings_typed_on_resume_act_from_the_current_step():
    """A resume re-applies the settings (apply_optimizer_settings): a schedule and a momentum warmup
    typed there give this step the values they would have had from the start."""
    lit = _lit(optimizer="muon", warmup_steps=0, learning_rate=1e-3, min_lr=1e-4, muon_lr=0.05)
    out = lit.configure_optimizers()
    opt, schedule = out["optimizer"], out["lr_scheduler"]["scheduler"]
    for _ in range(30):  # 30 steps of the run as it was (cosine, momentum 0.95 throughout)
        opt.step()
        lit.lr_scheduler_step(schedule, None)
    assert opt.param_groups[2]["momentum"] == 0.95
    lit.hparams.update(lr_schedule="wsd", cooldown_fraction=0.5, muon_momentum_warmup_steps=40)  # typed on the resume
    lit.apply_optimizer_settings(opt, schedule)
    assert opt.param_groups[2]["momentum"] == pytest.approx(muon_momentum_at(30, 40, 0.95))
    assert opt.param_groups[2]["lr"] == pytest.approx(0.05)  # wsd holds the peak until step 50
    for _ in range(25):
        opt.step()
        lit.lr_scheduler_step(schedule, None)
    assert opt.param_groups[2]["momentum"] == 0.95
    assert opt.param_groups[2]["lr"] == pytest.approx(0.05 * warmup_stable_decay(55, 0, 100, 0.1, 0.5))


def test_muon_refuses_fsdp_shards():
    from lightning.pytorch.strategies import FSDPStrategy  # FSDP hands the optimizer flat shards

    lit = _lit(optimizer="muon")
    lit._trainer.strategy = FSDPStrategy()
    with pytest.raises(UserError, match="FSDP"):
        lit.configure_optimizers()


def test_fp16_gets_an_unfused_optimizer():
    lit = _lit()
    lit._trainer.precision = "16-mixed"
    assert not lit.configure_optimizers()["optimizer"].defaults.get("fused")


def test_gradient_clipping_with_the_fused_optimizer():
    lit = _lit()
    opt = lit.configure_optimizers()["optimizer"]
    for p in lit.parameters():
        p.grad = torch.full_like(p, 10.0)
    lit.configure_gradient_clipping(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    norm = torch.sqrt(sum((p.grad**2).sum() for p in lit.parameters()))
    assert norm == pytest.approx(1.0, rel=1e-4)


def test_loss_ignores_masked_targets():
    lit = _lit()
    idx = torch.randint(10, (2, 8))
    y = torch.randint(10, (2, 8))
    masked = y.clone()
    masked[:, :4] = -100
    full = lit.loss(idx, y, reduction="none").view(2, 8)
    assert lit.loss(idx, masked, reduction="sum").item() == pytest.approx(full[:, 4:].sum().item(), rel=1e-5)


@pytest.mark.parametrize("sdpa", [True, False])
def test_cpu_bf16_attention_is_hand_written_and_close_to_fp32(sdpa, monkeypatch):
    """On the CPU under bf16 autocast attention takes the hand-written bf16 path (SDPA's
    bf16 kernel is slow there), and stays within bf16 rounding of fp32 attention."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, use_sdpa=sdpa)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        exact = attn(x)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called on the CPU bf16 path")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        q, _, _ = attn.heads(x)
        assert q.dtype == torch.bfloat16 and not attn.fused(q)
        y = attn(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), exact, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(y.float(), exact, atol=1e-6)  # it really ran in bf16


def _as_if_on_a_gpu(lit, monkeypatch):
    """Every branch LitLM takes by device sees CUDA (the tensors stay on the CPU)."""
    monkeypatch.setattr(type(lit), "device", property(lambda self: torch.device("cuda", 0)))


def test_a_training_step_never_waits_for_the_device(monkeypatch):
    """No host-device synchronisation in a steady-state step: nothing reads a tensor's value
    (item, bool, tolist) outside the logging steps."""
    lit = _lit()
    _as_if_on_a_gpu(lit, monkeypatch)
    monkeypatch.setattr(lit, "log", lambda *a, **k: None)
    batch = (torch.randint(10, (2, 8)), torch.randint(10, (2, 8)))
    for step in (1, 2, 3):
        lit._trainer.global_step = step
        for name in ("item", "__bool__", "tolist", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, lambda *a: pytest.fail("host-device sync in a training step"))
        lit.on_train_batch_start(batch, 0)
        lit.training_step(batch, 0)
        monkeypatch.undo()
        _as_if_on_a_gpu(lit, monkeypatch)
        monkeypatch.setattr(lit, "log", lambda *a, **k: None)


def test_progress_bar_values_live_on_the_cpu(monkeypatch):
    """The progress bar reads every value it shows back to the host at every step: on a GPU
    they must already be on the CPU, or each step would wait for the device."""
    from gptnano.train.callbacks import Throughput

    lit = _lit()
    _as_if_on_a_gpu(lit, monkeypatch)
    logged = []
    monkeypatch.setattr(lit, "log", lambda name, value, **kw: logged.append((name, value, kw.get("prog_bar"))))
    batch = (torch.randint(10, (2, 8)), torch.randint(10, (2, 8)))
    lit.training_step(batch, 0)  # step 0: a logging step
    meter = Throughput(window=1, peak_flops=1e15)
    lit._trainer.global_step = 1
    for _ in range(2):
        meter.on_train_batch_end(lit._trainer, lit, None, batch, 0)
    shown = {name: value for name, value, bar in logged if bar}
    assert set(shown) == {"loss", "perf/tok_s", "perf/mfu"}
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in shown.values()), shown


class _Agreeing:
    """A strategy's reduce across processes, as the guard calls it: here another process
    reports ``other`` (a bad step, or -1 / a finite flag of 1 for "fine")."""

    def __init__(self):
        self.calls = []

    def reduce(self, value, reduce_op):
        self.calls.append(reduce_op)
        return value


def _guarded(monkeypatch, on_gpu: bool = True):
    from lightning.pytorch.trainer.states import TrainerFn

    lit = _lit()
    if on_gpu:
        _as_if_on_a_gpu(lit, monkeypatch)
    trainer = lit._trainer
    trainer.strategy = _Agreeing()
    trainer.state = type("State", (), {"fn": TrainerFn.FITTING})()
    return lit, trainer, NonFiniteGuard()


def test_a_non_finite_loss_between_checks_still_blocks_every_later_checkpoint(monkeypatch):
    lit, trainer, guard = _guarded(monkeypatch)
    trainer.global_step = 3  # not a logging step (every 50): the host does not look now
    guard.on_before_backward(trainer, lit, torch.tensor(float("nan")))
    guard.on_train_batch_end(trainer, lit, None, None, 0)  # no check here on a GPU ...
    trainer.global_step = 4
    guard.on_before_backward(trainer, lit, torch.tensor(1.0))  # a later finite loss does not clear it
    with pytest.raises(UserError, match="non-finite at step 3"):
        guard.on_save_checkpoint(trainer, lit, {})  # ... but no checkpoint is ever written after it
    trainer.global_step = 50
    with pytest.raises(UserError, match="non-finite at step 3"):
        guard.on_train_batch_end(trainer, lit, None, None, 0)  # and the next logging step stops the run
    assert set(trainer.strategy.calls) == {"min"}  # every verdict went through the strategy's reduction


def test_the_guard_reads_the_device_only_when_it_checks(monkeypatch):
    lit, trainer, guard = _guarded(monkeypatch)
    trainer.global_step = 7
    for name in ("item", "__bool__", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a: pytest.fail("host-device sync in a training step"))
    guard.on_before_backward(trainer, lit, torch.tensor(2.0))
    guard.on_train_batch_end(trainer, lit, None, None, 0)


def test_non_finite_weights_are_never_checkpointed(monkeypatch):
    lit, trainer, guard = _guarded(monkeypatch, on_gpu=False)
    guard.on_save_checkpoint(trainer, lit, {})  # finite: fine
    with torch.no_grad():
        lit.net.wte.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="weights became non-finite"):
        guard.on_save_checkpoint(trainer, lit, {})


def test_sampling_draws_on_the_device_that_samples(monkeypatch):
    """The prompt goes to the model's device before the seeded generator is made for it, so
    multinomial always gets probabilities and a generator on one device."""
    import gptnano.train.module as lit_module

    seen = {}

    def fake_generate(net, prompt, n, generator=None, **kw):
        seen["prompt"], seen["generator"] = prompt.device, generator.device
        return prompt

    monkeypatch.setattr(lit_module, "generate", fake_generate)
    lit = _lit(sample_seed=3)
    lit.sample(torch.zeros(1, 1, dtype=torch.long))
    assert seen["prompt"] == seen["generator"] == lit.device


def test_text_sample_leaves_the_random_streams_as_it_found_them(monkeypatch):
    from gptnano.train.callbacks import TextSample

    class Experiment:
        def add_text(self, tag, text, step):
            self.text = text

    class Trainer:
        sanity_checking, is_global_zero, global_step = False, True, 7
        state = type("State", (), {"fn": "fit"})()
        loggers = [type("Logger", (), {"experiment": Experiment()})()]

    lit = _lit()  # no sample_seed: sampling draws from the global stream
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    TextSample(max_new_tokens=20).on_validation_end(Trainer(), lit)
    assert len(Trainer.loggers[0].experiment.text) > 20
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("sdpa_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_takes_sdpa_on_a_gpu_compiled_or_not(sdpa_dtype):
    from gptnano.models.layers import hand_written_is_faster

    assert not hand_written_is_faster("cuda", sdpa_dtype, compiling=False)
    assert not hand_written_is_faster("cuda", sdpa_dtype, compiling=True)
    assert hand_written_is_faster("cpu", torch.float32, compiling=True)
    assert hand_written_is_faster("cpu", torch.bfloat16, compiling=False)
    assert not hand_written_is_faster("cpu", torch.float32, compiling=False)


def test_last_checkpoint_refreshes_by_wall_clock(monkeypatch):
    from datetime import timedelta

    import gptnano.train.checkpointing as callbacks

    clock = [1000.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    ckpt = callbacks.Checkpoint(train_time_interval=timedelta(minutes=3))
    trainer = type("T", (), {"global_step": 5, "world_size": 1, "log_every_n_steps": 50})()
    assert not ckpt._refresh_due(trainer)
    clock[0] += 179
    assert not ckpt._refresh_due(trainer)
    clock[0] += 1
    assert ckpt._refresh_due(trainer)  # 3 minutes since the start: refresh last.ckpt
    assert callbacks.Checkpoint(train_time_interval=None, last_every_n_steps=5)._refresh_due(trainer)
    assert not callbacks.Checkpoint(train_time_interval=None)._refresh_due(trainer)
