"""The Backpack's defining properties: its sense network and logits are the
reference implementation's equations, alpha is causal and normalised, the
logits are exactly E (sum_j sum_l alpha C), a sense can be removed exactly,
cached generation equals the full forward pass, and weights of the earlier
sense network are refused in one line."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gptnano.checkpoint import load_net
from gptnano.errors import UserError
from gptnano.models.backpack import Backpack
from gptnano.sampling import generate, generate_naive
from tests.helpers import random_tokens, scrambled

VOCAB, BLOCK, SENSES = 11, 12, 4


def small_backpack(seed: int = 0) -> Backpack:
    torch.manual_seed(seed)
    return scrambled(Backpack(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, n_senses=SENSES))


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return random_tokens(VOCAB, B, T, seed)


# ----- the reference's equations, written out with plain tensor ops ----------
# Hewitt et al.'s code (github.com/john-hewitt/backpacks-flash-attn) computes the senses
#   r1 = e + LN0(e);  r2 = r1 + MLP(LN1(r1));  C(x) = FinalMLP(LN2(r2)),
# FinalMLP: C -> 4C -> GELU -> n_senses * C, and the logits E^T sum_l (alpha_l @ C_l),
# with alpha from a GPT-2 over the same embeddings. These functions read the weights by name.


def layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def mlp(x, sd, name):
    return linear(F.gelu(linear(x, sd, f"{name}.c_fc")), sd, f"{name}.c_proj")


def causal_softmax(scores):
    T = scores.size(-1)
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def reference_senses(model, idx):
    """(B, T) -> (B, T, n_senses, C)."""
    sd = model.state_dict()
    e = sd["wte.weight"][idx]
    r1 = e + layer_norm(e, sd, "sense_net.ln_0")
    r2 = r1 + mlp(layer_norm(r1, sd, "sense_net.ln_1"), sd, "sense_net.mlp")
    senses = mlp(layer_norm(r2, sd, "sense_net.ln_2"), sd, "sense_net.final_mlp")  # (B, T, n_senses * C)
    return senses.reshape(*idx.shape, model.n_senses, model.n_embd)


def reference_logits(model, idx):
    """(B, T) -> (B, T, vocab_size)."""
    sd, (B, T), H = model.state_dict(), idx.shape, model.blocks[0].mixer.n_head
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    for i in range(model.n_layer):  # GPT-2 (without the reference's 1 / (i + 1) score scaling)
        q, k, v = linear(layer_norm(x, sd, f"blocks.{i}.ln_1"), sd, f"blocks.{i}.mixer.c_attn").chunk(3, -1)
        q, k, v = (t.reshape(B, T, H, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hs)
        att = causal_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)))
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, -1), sd, f"blocks.{i}.mixer.c_proj")
        x = x + mlp(layer_norm(x, sd, f"blocks.{i}.ln_2"), sd, f"blocks.{i}.mlp")
    qk = linear(layer_norm(x, sd, "ln_f"), sd, "sense_qk")
    q, k = qk.reshape(B, T, 2, model.n_senses, model.sense_head_size).unbind(2)  # each (B, T, n_senses, hs)
    alpha = causal_softmax(torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(model.sense_head_size))
    senses = reference_senses(model, idx).transpose(1, 2)  # (B, n_senses, T, C)
    o = (alpha @ senses).sum(1)  # (B, n_senses, T, T) @ (B, n_senses, T, C), summed over senses: (B, T, C)
    return o @ sd["wte.weight"].T


def test_sense_vectors_are_the_reference_equations():
    model, idx = small_backpack(), tokens(3, BLOCK)
    torch.testing.assert_close(model.sense_vectors(idx), reference_senses(model, idx))


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_logits_are_the_reference_equations(use_sdpa):
    torch.manual_seed(0)
    model = scrambled(Backpack(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16,
                               n_senses=SENSES, use_sdpa=use_sdpa))
    idx = tokens(3, BLOCK)
    torch.testing.assert_close(model(idx), reference_logits(model, idx))


def test_the_sense_network_is_the_papers_size():
    """Two LayerNorm-ed residual steps and a final MLP out to n_senses * C: ~ (12 + 4 n_senses) C^2."""
    C, k = 80, 16
    net = Backpack(n_embd=C, n_senses=k).sense_net
    mlp_params, final_params = 8 * C * C + 5 * C, 4 * C * C + 4 * C + 4 * C * k * C + k * C
    assert sum(p.numel() for p in net.parameters()) == 3 * 2 * C + mlp_params + final_params


def test_initialised_as_the_reference():
    """N(0, 0.02) weights and zero biases; the second Linear of every MLP, the sense network's
    projection to the senses included, at 0.02 / sqrt(2 n_layer)."""
    torch.manual_seed(0)
    model = Backpack(n_layer=4)
    proj = model.sense_net.final_mlp.c_proj
    assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.02)
    assert model.sense_net.final_mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.sense_net.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert not proj.bias.any() and torch.equal(model.sense_net.ln_2.weight, torch.ones(model.n_embd))


def test_flops_per_token_counts_every_product():
    """6N + attention terms equals what torch counts for a forward and backward pass, to the
    parameters that take part in no product (biases, LayerNorms, positions)."""
    torch.manual_seed(0)
    model = Backpack(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, n_senses=4,
                     use_sdpa=False)
    B = 3
    with FlopCounterMode(display=False) as counter:
        model(tokens(B, BLOCK)).sum().backward()
    no_product = sum(p.numel() for name, p in model.named_parameters()
                     if name.endswith("bias") or p.dim() == 1 or name == "wpe.weight")
    # The gradient of the embedding lookup is no product either: the tied head's E is counted once, as 6 V C.
    counted = counter.get_total_flops() / (B * BLOCK)
    assert model.flops_per_token() - 6 * (no_product - model.wpe.weight.numel()) == pytest.approx(counted, rel=1e-6)


def test_alpha_rows_are_causal_softmaxes():
    model, idx = small_backpack(), tokens(3, BLOCK)
    alpha = model.sense_weights(idx)  # (B, n_senses, T, T)
    assert alpha.shape == (3, SENSES, BLOCK, BLOCK)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3, SENSES, BLOCK))
    future = torch.ones(BLOCK, BLOCK, dtype=torch.bool).triu(1)
    assert (alpha[..., future] == 0).all(), "position i must put zero weight on positions j > i"
    assert (alpha[..., ~future] > 0).all(), "a softmax gives every visible position some weight"


def test_logits_are_the_explicit_double_sum_over_positions_and_senses():
    model, idx = small_backpack(), tokens(2, 7)
    alpha, senses, E = model.sense_weights(idx), model.sense_vectors(idx), model.wte.weight
    B, T = idx.shape
    expected = torch.zeros(B, T, VOCAB)
    for b in range(B):
        for i in range(T):
            o = torch.zeros(model.n_embd)
            for j in range(i + 1):
                for sense in range(SENSES):
                    o += alpha[b, sense, i, j] * senses[b, j, sense]
            expected[b, i] = E @ o
    torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)


def test_senses_are_context_free():
    model = small_backpack()
    a, b = torch.tensor([[3, 5, 7]]), torch.tensor([[9, 1, 7]])
    torch.testing.assert_close(model.sense_vectors(a)[0, 2], model.sense_vectors(b)[0, 2])


def test_single_token_prediction_is_the_sum_of_its_sense_logits():
    # With one token every alpha row is [1], so the prediction is sum_l C(x)[l] E^T.
    model = small_backpack()
    torch.testing.assert_close(model(torch.tensor([[4]]))[0, 0], model.sense_logits(4).sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sense", [0, SENSES - 1])
def test_removing_a_sense_subtracts_exactly_its_contribution(sense):
    model, idx = small_backpack(), tokens(2, BLOCK)
    alpha, senses = model.sense_weights(idx), model.sense_vectors(idx)
    contribution = F.linear(torch.einsum("bij,bjc->bic", alpha[:, sense], senses[:, :, sense]), model.wte.weight)
    full = model(idx)
    with model.scaled_sense(sense, 0.0):
        removed = model(idx)
        removed_cached, _ = model.forward_cached(idx)  # the cached path honours the scale too
    torch.testing.assert_close(full - removed, contribution, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(removed_cached, removed[:, -1], atol=1e-5, rtol=1e-5)
    assert contribution.abs().max() > 1e-2, "the test needs a sense that matters"
    torch.testing.assert_close(model(idx), full)  # leaving the block restores the sense
    assert "sense_scale" not in model.state_dict()  # an experiment, not a weight


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_cached_steps_equal_the_full_forward(prompt_len):
    model, idx = small_backpack(), tokens(2, BLOCK + 6)
    logits, cache = model.forward_cached(idx[:, :prompt_len])
    for t in range(prompt_len, idx.size(1) + 1):
        # The naive reference: a full forward over the last block_size tokens.
        expected = model(idx[:, max(0, t - BLOCK) : t])[:, -1]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=f"step {t}")
        if t < idx.size(1):
            logits, cache = model.forward_cached(idx[:, t : t + 1], cache)
    assert cache.kv is None, "beyond block_size the cache falls back to the naive path"


def test_cache_holds_keys_and_senses_of_every_past_token():
    model, idx = small_backpack(), tokens(2, 6)
    _, cache = model.forward_cached(idx[:, :4])
    _, cache = model.forward_cached(idx[:, 4:6], cache)
    assert cache.sense_keys.shape == (2, SENSES, 6, model.sense_head_size)
    torch.testing.assert_close(cache.senses, model.sense_vectors(idx))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_cached_equals_naive(temperature):
    # Greedy output of a random model soon repeats one token, so sampling with
    # the same seed on both paths checks varied text too.
    model, prompt = small_backpack(seed=2), tokens(2, 3)
    fast, slow = (
        sample(model, prompt, 2 * BLOCK, temperature=temperature, generator=torch.Generator().manual_seed(0))
        for sample in (generate, generate_naive)
    )
    assert torch.equal(fast, slow)
    assert fast.size(1) == 3 + 2 * BLOCK


def test_every_sense_needs_an_alpha_dimension():
    assert Backpack(n_embd=16, n_senses=3).sense_head_size == 5
    with pytest.raises(ValueError, match="n_senses"):
        Backpack(n_embd=8, n_senses=9)


# ----- weights of the earlier sense network --------------------------------
# tests/fixtures/backpack-45612a8.ckpt was written by `gptnano fit` at 45612a8, whose
# sense network was Linear(e + MLP(LN(e))): its weights cannot be carried over.
OLD_BACKPACK = Path(__file__).parent / "fixtures" / "backpack-45612a8.ckpt"
REFUSED = "trained with gptnano's earlier sense network.*before it followed the paper.*retrain it"


def test_an_earlier_backpack_checkpoint_is_refused_with_the_reason():
    with pytest.raises(UserError, match=REFUSED) as refused:
        load_net(OLD_BACKPACK)
    assert str(OLD_BACKPACK) in str(refused.value) and "\n" not in str(refused.value)


# Every command reads a checkpoint through gptnano.checkpoint.read_checkpoint, which refuses it
# before anything is built or trained (a typed network setting, Lightning's own loading included).
@pytest.mark.parametrize("command", [["generate"], ["senses", "--token", "e"], ["predict"],
                                     ["predict", "--model.net.dropout", "0.1"], ["validate"], ["fit"],
                                     ["export", "--out", "exported"]])
def test_every_reader_refuses_an_earlier_backpack_in_one_line(command, tmp_path, gptnano):
    assert_refused_in_one_line(gptnano([*command, "--ckpt_path", str(OLD_BACKPACK)], tmp_path))


def test_a_new_run_from_an_earlier_backpack_is_refused_in_one_line(tmp_path, gptnano):
    assert_refused_in_one_line(gptnano(["fit", "--init_from", str(OLD_BACKPACK), "--run_name", "ft"], tmp_path))


def assert_refused_in_one_line(ran) -> None:
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("gptnano: error:")]
    assert len(errors) == 1 and errors == ran.stderr.strip().splitlines()[-1:], ran.stderr[-2000:]
    assert re.search(REFUSED, errors[0]) and str(OLD_BACKPACK) in errors[0]
