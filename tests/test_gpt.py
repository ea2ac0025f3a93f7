"""GPT specifics: hand-written attention equals PyTorch's fused kernel, and the attention
probabilities it shows (``CausalSelfAttention.probabilities``) are the ones it uses."""

import pytest
import torch

from gptnano.models.gpt import GPT, CausalSelfAttention


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
