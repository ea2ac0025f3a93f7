"""GPT specifics: hand-written attention equals PyTorch's fused kernel, the attention
probabilities it shows (``CausalSelfAttention.probabilities``) are the ones it uses, and
each newer option (rotary positions, QK-norm, the embedding shortcut, the logit soft-cap)
does what its paper says, in every path: full forward, cache, fused kernel."""

import pytest
import torch
import torch.nn.functional as F

from gptnano.models.gpt import GPT, CausalSelfAttention, Rotary, causal_softmax
from gptnano.sampling import generate, generate_naive
from tests.helpers import scrambled


@pytest.mark.parametrize("B,T,C,nh", [(1, 1, 8, 1), (2, 7, 16, 2), (3, 33, 64, 4), (2, 64, 48, 6)])
@pytest.mark.parametrize("train", [True, False])
def test_hand_attention_equals_sdpa(B, T, C, nh, train):
    torch.manual_seed(T)
    hand = CausalSelfAttention(C, nh, dropout=0.0, use_sdpa=False)
    fused = CausalSelfAttention(C, nh, dropout=0.0, use_sdpa=True)
    fused.load_state_dict(hand.state_dict())
    hand.train(train), fused.train(train)
    x = torch.randn(B, T, C, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y1, y2 = hand(x), fused(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for (n, p1), p2 in zip(hand.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6, msg=n)
    # What the fused kernel computes is what probabilities() shows: output = c_proj(heads of att @ v).
    with torch.no_grad():
        att = hand.probabilities(x)  # (B, nh, T, T)
        v = hand.c_attn(x).split(C, dim=2)[2].view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        y = hand.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        torch.testing.assert_close(y, fused.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 2, 9])
def test_attention_probabilities_are_causal_and_normalised(T):
    """Row i of every head is a distribution over positions 0..i: it sums to 1 and is exactly 0
    above the diagonal. Dropout (here p = 0.5, in training mode) never touches it, and reading
    it draws no random numbers."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 4, dropout=0.5).train()
    x = torch.randn(3, T, 16)
    torch.manual_seed(1)
    expected_draw = torch.rand(4)
    torch.manual_seed(1)
    with torch.no_grad():
        att = attn.probabilities(x)
    assert torch.equal(torch.rand(4), expected_draw)
    assert att.shape == (3, 4, T, T)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 4, T))
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert torch.equal(att[..., above], torch.zeros_like(att[..., above]))
    assert (att[..., ~above] > 0).all()


def test_whole_gpt_same_with_and_without_sdpa():
    torch.manual_seed(0)
    a = GPT(vocab_size=20, block_size=32, n_layer=2, n_head=4, n_embd=32, use_sdpa=False).eval()
    b = GPT(vocab_size=20, block_size=32, n_layer=2, n_head=4, n_embd=32, use_sdpa=True).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(20, (3, 32))
    torch.testing.assert_close(a(idx), b(idx), rtol=1e-5, atol=1e-5)


def test_weights_are_tied_and_residual_init_is_scaled():
    m = GPT(vocab_size=20, block_size=8, n_layer=8, n_head=2, n_embd=64)
    assert m.lm_head.weight is m.wte.weight
    proj = m.blocks[0].mixer.c_proj.weight.std().item()
    fc = m.blocks[0].mlp.c_fc.weight.std().item()
    assert abs(fc - 0.02) < 0.003 and abs(proj - 0.02 / 4) < 0.001


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(ValueError, match="divisible"):
        GPT(n_embd=30, n_head=4)


def test_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8)(torch.zeros(1, 5, dtype=torch.long))


# ----- The newer options (all off by default) -----------------------------------------------------
OPTIONS = {  # name -> the GPT's keywords; "all" turns every one on at once
    "rope": dict(rope=True),
    "qk_norm": dict(qk_norm=True),
    "embed_shortcut": dict(embed_shortcut=True),
    "logit_softcap": dict(logit_softcap=3.0),
    "all": dict(rope=True, qk_norm=True, embed_shortcut=True, logit_softcap=3.0),
}
SMALL = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16)


def with_options(name: str, **sizes) -> GPT:
    """A small GPT with option ``name`` on, its weights scrambled: the shortcut's lambdas and
    QK-norm's gains far from their neutral start, so that each option really acts."""
    torch.manual_seed(0)
    return scrambled(GPT(**{**SMALL, **sizes, **OPTIONS[name]}))


def test_rope_scores_depend_only_on_relative_position():
    """RoFormer's property: after turning q to position m and k to position n, q . k depends on
    m - n alone. Shifting both positions by the same offset leaves every score, hence every
    attention probability, unchanged; position 0 turns nothing, and a turn keeps lengths."""
    torch.manual_seed(0)
    rope = Rotary(head_size=8, block_size=40)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        return rope(q.view(1, 8), m) @ rope(k.view(1, 8), n).view(8)

    for m, n in [(0, 0), (5, 2), (3, 9), (17, 17)]:
        for shift in (1, 7, 22):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3))  # and the distance does matter
    x = torch.randn(2, 3, 10, 8)
    torch.testing.assert_close(rope(x, 0)[..., :1, :], x[..., :1, :])
    torch.testing.assert_close(rope(x, 13).norm(dim=-1), x.norm(dim=-1))
    # The attention a whole window makes is the same wherever the window starts.
    attn = CausalSelfAttention(16, 2, rope=Rotary(8, 40))
    seq = torch.randn(2, 10, 16)
    with torch.no_grad():
        shown = [causal_softmax(*attn.heads(seq, offset)[:2]) for offset in (0, 6, 30)]
    for att in shown[1:]:
        torch.testing.assert_close(att, shown[0], rtol=1e-5, atol=1e-6)


def test_logit_softcap_bounds_the_logits_and_leaves_small_ones_alone():
    """c * tanh(logits / c): never beyond c, however large the logits grow, and about the
    logits themselves where they are small next to c (tanh(u) = u - u^3/3 + ...)."""
    capped = with_options("logit_softcap")
    with torch.no_grad():
        capped.ln_f.weight.mul_(100.0)  # logits in the tens, far beyond the cap
    plain = GPT(**SMALL)
    plain.load_state_dict(capped.state_dict())  # the cap has no weights: the same network otherwise
    idx = torch.randint(11, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw, logits = plain.eval()(idx), capped(idx)
    assert raw.abs().max() > 10 * 3.0 and logits.abs().max() <= 3.0
    torch.testing.assert_close(logits, 3.0 * torch.tanh(raw / 3.0))
    small = GPT(**SMALL, logit_softcap=30.0)  # at init the logits are ~0.1, far below 30
    torch.manual_seed(0)
    small_plain = GPT(**SMALL)
    small.load_state_dict(small_plain.state_dict())
    with torch.no_grad():
        near, exact = small(idx), small_plain(idx)
    assert exact.abs().max() < 1.0
    torch.testing.assert_close(near, exact, rtol=0, atol=float(exact.abs().max() ** 3 / (3 * 30.0**2)) + 1e-7)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_cached_generation_equals_the_full_forward(name):
    """Each cached step (RoPE turning new keys at the cache's offset) gives the logits of a full
    forward pass over the same text, also past block_size where the window slides."""
    model = with_options(name)
    idx = torch.randint(11, (2, 5), generator=torch.Generator().manual_seed(2))
    logits, cache = model.forward_cached(idx)
    history = idx
    with torch.no_grad():
        for _ in range(20):
            torch.testing.assert_close(logits, model.naive_last_logits(history), rtol=1e-4, atol=1e-4)
            nxt = logits.argmax(-1, keepdim=True)
            history = torch.cat([history, nxt], 1)
            logits, cache = model.forward_cached(nxt, cache)
    assert torch.equal(generate(model, idx, 25, temperature=0), generate_naive(model, idx, 25, temperature=0))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_sdpa_equals_the_hand_written_attention(name):
    """The fused kernel and the hand-written lines compute the same logits and gradients with each
    option on, and probabilities() shows the softmax the hand-written path takes."""
    hand, fused = with_options(name, use_sdpa=False).train(), with_options(name, use_sdpa=True).train()
    idx = torch.randint(11, (3, 16), generator=torch.Generator().manual_seed(3))
    y1, y2 = hand(idx), fused(idx)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y1)
    y1.backward(g), y2.backward(g)
    for (n, p1), p2 in zip(hand.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-4, msg=n)
    attn, x = fused.blocks[0].mixer.eval(), torch.randn(3, 16, 16)
    with torch.no_grad():
        v = attn.heads(x)[2]
        y = attn.c_proj((attn.probabilities(x) @ v).transpose(1, 2).reshape(3, 16, 16))
        torch.testing.assert_close(y, attn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_is_causal_and_trains_every_parameter(name):
    """Changing token t leaves earlier logits alone; a backward pass reaches every parameter
    (QK-norm's gains, the shortcut's lambdas) from their initial values on."""
    model = with_options(name).eval()
    idx = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(idx)
        for t in (0, 7, 15):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 11
            torch.testing.assert_close(model(changed)[:, :t], base[:, :t], rtol=0, atol=1e-6)
    torch.manual_seed(0)
    fresh = GPT(**SMALL, **OPTIONS[name])
    F.cross_entropy(fresh(idx).flatten(0, 1), torch.randint(11, (32,))).backward()
    missing = [n for n, p in fresh.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"


def test_options_off_add_nothing_and_rope_drops_the_learned_positions():
    """Off, a GPT has GPT-2's weights and draws the same initial values (checkpoints of earlier
    versions load, tests/test_compat.py); rope's tables are not weights, and replace wpe."""
    torch.manual_seed(0)
    plain = GPT(**SMALL)
    torch.manual_seed(0)
    off = GPT(**SMALL, rope=False, qk_norm=False, embed_shortcut=False, logit_softcap=None)
    assert [(k, v.shape) for k, v in off.state_dict().items()] == [(k, v.shape) for k, v in plain.state_dict().items()]
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), plain.state_dict().values()))
    assert not list(off.buffers())
    on = GPT(**SMALL, **OPTIONS["all"])
    keys = set(on.state_dict()) - set(plain.state_dict())
    assert keys == {"x0_weight", *(f"blocks.{i}.mixer.{g}_gain" for i in (0, 1) for g in "qk")}
    assert set(plain.state_dict()) - set(on.state_dict()) == {"wpe.weight"} and on.wpe is None
    assert GPT(**SMALL, rope=True).flops_per_token() == plain.flops_per_token()  # wpe's lookups never counted


def test_option_values_are_checked():
    with pytest.raises(ValueError, match="even head size"):
        GPT(n_embd=12, n_head=4, rope=True)
    with pytest.raises(ValueError, match="rope_base must be positive"):
        GPT(rope=True, rope_base=0.0)
    with pytest.raises(ValueError, match="logit_softcap must be positive"):
        GPT(logit_softcap=0.0)
