"""The Backpack's defining properties: alpha is causal and normalised, the
logits are exactly E (sum_j sum_l alpha C), a sense can be removed exactly,
and cached generation equals the full forward pass."""

import pytest
import torch
import torch.nn.functional as F

from gptnano.models.backpack import Backpack
from gptnano.sampling import generate, generate_naive
from tests.helpers import random_tokens, scrambled

VOCAB, BLOCK, SENSES = 11, 12, 4


def small_backpack(seed: int = 0) -> Backpack:
    torch.manual_seed(seed)
    return scrambled(Backpack(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, n_senses=SENSES))


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return random_tokens(VOCAB, B, T, seed)


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
