"""The LightningModule's own pieces: schedule, optimizer groups, clipping, metrics."""

import pytest
import torch
import torch.nn.functional as F

from gptnano.errors import UserError
from gptnano.lit import LitLM, warmup_cosine
from gptnano.models import GPT
from gptnano.models.layers import CausalSelfAttention
from gptnano.optim import MuonAdamW, muon_matrices


def test_warmup_then_cosine_to_min():
    f = lambda s: warmup_cosine(s, warmup_steps=10, decay_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.5 * 0.9)  # half way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 200))


class _Trainer:
    max_steps, precision, strategy = 100, "bf16-mixed", None


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
        schedule.step()
    assert muon["lr"] == pytest.approx(0.05 * 0.1) and decay["lr"] == pytest.approx(1e-3 * 0.1)


def test_muon_refuses_fsdp_shards():
    class FSDPStrategy:  # stands in for Lightning's: FSDP hands the optimizer flat shards
        pass

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
    exact = attn._attend(*attn._heads(x), causal_offset=0)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called on the CPU bf16 path")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = attn._heads(x)
        assert q.dtype == torch.bfloat16
        y = attn._attend(q, k, v, causal_offset=0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), exact, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(y.float(), exact, atol=1e-6)  # it really ran in bf16
