"""The contract every architecture keeps, checked for each one in the registry.

Adding an architecture to gptnano.models.MODELS is enough for it to be tested here.
"""

import inspect

import pytest
import torch

from gptnano.models import MODELS
from gptnano.sampling import generate, generate_naive

VOCAB = 11
# Small sizes for every model; each constructor takes the keys it knows.
TINY = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16, n_senses=3)
OVERRIDES = {"cnn": dict(n_layer=4, kernel_size=3)}  # receptive field 1 + 2*(1+2+4+8) >= 16


def build(name: str, **extra):
    cls = MODELS[name]
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in {**TINY, **OVERRIDES.get(name, {}), **extra}.items() if k in params}
    torch.manual_seed(0)
    return cls(**kwargs)


ARCHS = sorted(MODELS)


@pytest.mark.parametrize("name", ARCHS)
def test_shapes(name):
    model = build(name)
    for B, T in [(1, 1), (3, 7), (2, 16)]:
        logits = model(torch.randint(VOCAB, (B, T)))
        assert logits.shape == (B, T, VOCAB)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ARCHS)
def test_causal(name):
    """Changing token t leaves the logits at positions < t unchanged."""
    model = build(name).eval()
    idx = torch.randint(VOCAB, (2, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:])  # and later positions do see it


@pytest.mark.parametrize("name", ARCHS)
def test_gradients_reach_every_parameter(name):
    model = build(name)
    logits = model(torch.randint(VOCAB, (2, 16)))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(VOCAB, (32,))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", ARCHS)
def test_overfits_one_batch(name):
    model = build(name)
    idx = torch.randint(VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.3, (first, loss.item())


@pytest.mark.parametrize("name", ARCHS)
def test_cached_generation_matches_full_forward(name):
    """Each cached step's logits equal a full forward pass over the same text."""
    model = build(name).eval()
    idx = torch.randint(VOCAB, (2, 5))
    logits, cache = model.forward_cached(idx)
    history = idx
    with torch.no_grad():
        for _ in range(25):  # runs past block_size=16, into the sliding-window regime
            torch.testing.assert_close(logits, model.naive_last_logits(history), rtol=1e-4, atol=1e-5)
            nxt = logits.argmax(-1, keepdim=True)
            history = torch.cat([history, nxt], 1)
            logits, cache = model.forward_cached(nxt, cache)
    greedy = generate(model, idx, 30, temperature=0)
    assert torch.equal(greedy, generate_naive(model, idx, 30, temperature=0))


@pytest.mark.parametrize("name", ARCHS)
def test_generation_length_and_seed(name):
    model = build(name).eval()
    idx = torch.randint(VOCAB, (1, 3))
    out = generate(model, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert out.shape == (1, 23) and torch.equal(out[:, :3], idx)
    again = generate(model, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


BAD = [dict(n_embd=0), dict(n_layer=-1), dict(block_size=0), dict(dropout=1.0), dict(dropout=-0.1)]


@pytest.mark.parametrize("name,bad", [(n, b) for n in ARCHS for b in BAD
                                      if next(iter(b)) in inspect.signature(MODELS[n]).parameters])
def test_invalid_hyperparameters_raise(name, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        build(name, **bad)


def test_flops_per_token_is_positive_for_every_model():
    for name in ARCHS:
        assert build(name).flops_per_token() > 6 * 0.5 * build(name).num_params()


def test_dropout_is_skipped_only_where_it_would_do_nothing(monkeypatch):
    """The models' Dropout calls no operator in eval mode or at p = 0 (generation speed),
    and in training with p > 0 draws exactly the mask nn.Dropout draws."""
    from torch import nn

    from gptnano.models.layers import Dropout

    x = torch.randn(4, 32)
    torch.manual_seed(0)
    expected = nn.Dropout(0.5).train()(x)
    torch.manual_seed(0)
    assert torch.equal(Dropout(0.5).train()(x), expected) and not torch.equal(expected, x)

    def no_dropout(*args, **kwargs):
        raise AssertionError("F.dropout called")

    monkeypatch.setattr(torch.nn.functional, "dropout", no_dropout)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(AssertionError, match="F.dropout called"):
        Dropout(0.5).train()(x)
    for name in MODELS:  # every architecture uses it, none the plain nn.Dropout
        kinds = {type(m) for m in build(name, dropout=0.1).modules() if isinstance(m, nn.Dropout)}
        assert kinds == {Dropout}, (name, kinds)
