"""The causal CNN: the hand-written convolution equals torch's Conv1d, the
receptive field covers the context (or construction fails), and streaming
generation through per-layer queues equals the full forward pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptnano.models.cnn import CNN, CausalConv1d, dilation_schedule
from gptnano.sampling import generate, generate_naive
from tests.helpers import random_tokens, scrambled

VOCAB, BLOCK = 11, 16


def small_cnn(kernel_size: int = 2, n_layer: int = 4, tie_weights: bool = True, seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    return scrambled(CNN(vocab_size=VOCAB, block_size=BLOCK, n_layer=n_layer, n_embd=16, kernel_size=kernel_size,
                         tie_weights=tie_weights))


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return random_tokens(VOCAB, B, T, seed)


@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (2, 1), (2, 4), (3, 1), (3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_equals_torch_conv1d_with_left_padding(kernel_size, dilation, bias):
    torch.manual_seed(kernel_size * 10 + dilation)
    ours = CausalConv1d(5, 7, kernel_size, dilation, bias)
    ref = nn.Conv1d(5, 7, kernel_size, dilation=dilation, bias=bias)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
        if bias:
            ours.bias.normal_()
            ref.bias.copy_(ours.bias)
    x = torch.randn(3, 13, 5, requires_grad=True)  # (B, T, C): our layout
    x_ref = x.detach().clone().requires_grad_(True)
    y = ours(x)
    y_ref = ref(F.pad(x_ref.transpose(1, 2), ((kernel_size - 1) * dilation, 0))).transpose(1, 2)
    torch.testing.assert_close(y, y_ref)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    if bias:
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("kernel_size,dilation", [(2, 1), (2, 4), (3, 3)])
def test_causal_conv_streams_through_a_short_queue(kernel_size, dilation):
    torch.manual_seed(0)
    conv = CausalConv1d(4, 6, kernel_size, dilation)
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, 17, 4)
    queue, outputs = None, []
    for chunk in x.split([5, 1, 1, 7, 3], dim=1):  # a prompt, then steps of any size
        y, queue = conv.forward_cached(chunk, queue)
        outputs.append(y)
        assert queue.shape == (2, dilation * (kernel_size - 1), 4), "only what the kernel can still reach"
    torch.testing.assert_close(torch.cat(outputs, dim=1), conv(x))


def test_dilations_double_then_cycle():
    assert dilation_schedule(6, 2, 64) == [1, 2, 4, 8, 16, 32]
    assert dilation_schedule(8, 2, 64) == [1, 2, 4, 8, 16, 32, 1, 2]
    assert dilation_schedule(4, 3, 16) == [1, 2, 4, 8]  # 1 + 2 * 7 = 15 < 16
    assert CNN(block_size=64, n_layer=6, kernel_size=2).receptive_field == 64
    assert CNN(block_size=64, n_layer=6, kernel_size=3).receptive_field == 127


def test_too_small_receptive_field_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"receptive field 32 .*block_size=64.*raise n_layer or kernel_size"):
        CNN(block_size=64, n_layer=5, kernel_size=2)


def test_last_position_sees_the_whole_context():
    model, idx = small_cnn(), tokens(1, BLOCK)
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % VOCAB
    assert (model(idx)[0, -1] - model(changed)[0, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("kernel_size,n_layer", [(2, 4), (3, 4), (2, 6)])  # receptive field 16 == BLOCK, 31, 19
@pytest.mark.parametrize("tie_weights", [True, False])
def test_cached_steps_equal_the_full_forward(kernel_size, n_layer, tie_weights):
    model, idx = small_cnn(kernel_size, n_layer, tie_weights), tokens(2, BLOCK + 8)
    logits, cache = model.forward_cached(idx[:, :3])
    for t in range(3, idx.size(1) + 1):
        # The naive reference: a full forward over the last block_size tokens.
        expected = model(idx[:, max(0, t - BLOCK) : t])[:, -1]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=f"step {t}")
        if t < idx.size(1):
            logits, cache = model.forward_cached(idx[:, t : t + 1], cache)
    # Streaming is exact forever only when the receptive field equals block_size.
    assert (cache[1] is not None) == (model.receptive_field == BLOCK)


def test_long_prompt_streams_when_the_receptive_field_equals_the_context():
    model, idx = small_cnn(), tokens(2, 3 * BLOCK)
    logits, cache = model.forward_cached(idx)
    torch.testing.assert_close(logits, model(idx[:, -BLOCK:])[:, -1], atol=1e-5, rtol=1e-5)
    assert [q.size(1) for q in cache[1]] == model.dilations  # kernel_size 2: queue length = dilation


@pytest.mark.parametrize("kernel_size,n_layer", [(2, 4), (3, 4)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_cached_equals_naive(kernel_size, n_layer, temperature):
    model, prompt = small_cnn(kernel_size, n_layer, seed=2), tokens(2, 3)
    fast, slow = (
        sample(model, prompt, 3 * BLOCK, temperature=temperature, generator=torch.Generator().manual_seed(0))
        for sample in (generate, generate_naive)
    )
    assert torch.equal(fast, slow)


def test_tie_weights_flag():
    tied, untied = CNN(tie_weights=True), CNN(tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == untied.wte.weight.numel()
