"""RNN: an Elman network (Elman 1990, "Finding Structure in Time") as a language
model. Each layer keeps a hidden state, h_t = tanh(x_t W_x + b_x + h_{t-1} W_h + b_h),
and takes the place of attention in the GPT's pre-LayerNorm residual ``Block``
(imported from gpt.py). Order comes from the recurrence itself, so there is no
position embedding. The recurrence to read comes first; a faster and an exportable
version of it, each tested equal, come last.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptnano.models.base import LanguageModel, check_dropout, check_positive
from gptnano.models.gpt import Block
from gptnano.models.layers import Dropout, init_gpt2


def elman_scan(a: torch.Tensor, w_h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The recurrence, written as plainly as possible: h_t = tanh(a_t + h_{t-1} W_h^T).

    ``a[B, T, H]`` holds the input part ``x_t W_x^T + b_x + b_h`` of every step,
    ``w_h[H, H]`` is stored like an ``nn.Linear`` weight, ``h0[B, H]`` is the
    state before step 0. Returns all states ``[B, T, H]``. Autograd records every
    step, which makes this the reference that the fast path is tested against.
    """
    h, hs = h0, []
    for t in range(a.size(1)):
        h = torch.tanh(a[:, t] + h @ w_h.t())  # (B, H)
        hs.append(h)
    return torch.stack(hs, dim=1)  # (B, T, H)


class ElmanLayer(nn.Module):
    """One Elman recurrence: ``[B, T, n_in] -> [B, T, n_hidden]`` states, plus the last state.

    The input part of every step does not depend on the past, so it is computed
    for all T steps in one matrix product; only the h-recurrence is sequential.
    ``fast`` picks the hand-written backward (``ElmanScan``) over the plain loop.
    """

    def __init__(self, n_in: int, n_hidden: int, bias: bool = True, fast: bool = True):
        super().__init__()
        self.fast = fast
        self.w_x = nn.Linear(n_in, n_hidden, bias=bias)
        self.w_h = nn.Linear(n_hidden, n_hidden, bias=bias)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # b_h is added at every step, so fold it into the one-shot input projection.
        bias = None if self.w_x.bias is None else self.w_x.bias + self.w_h.bias
        a = F.linear(x, self.w_x.weight, bias)  # (B, T, H)
        # Under mixed precision `a` comes out in bf16/fp16; the recurrence runs in
        # the weights' precision instead, because rounding errors compound over steps.
        dtype = torch.promote_types(a.dtype, self.w_h.weight.dtype)
        w_h = self.w_h.weight.to(dtype)
        h0 = a.new_zeros(a.size(0), w_h.size(0), dtype=dtype) if h0 is None else h0.to(dtype)
        if torch.compiler.is_exporting():
            scan = elman_scan_exportable  # a graph with a loop in it, for any sequence length
        else:
            scan = ElmanScan.apply if self.fast else elman_scan
        hs = scan(a.to(dtype), w_h, h0)  # (B, T, H)
        return hs, hs[:, -1]


class ElmanMixer(nn.Module):
    """The RNN's token mixer for ``Block``: an Elman layer, then a projection back to the residual width."""

    def __init__(self, n_embd: int, n_hidden: int, dropout: float = 0.0, bias: bool = True, fast: bool = True):
        super().__init__()
        self.rnn = ElmanLayer(n_embd, n_hidden, bias, fast)
        # Named c_proj so init_gpt2 scales it like every other residual output projection.
        self.c_proj = nn.Linear(n_hidden, n_embd, bias=bias)
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_cached(x)[0]

    def forward_cached(self, x: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Continue from hidden state ``cache`` (``[B, n_hidden]`` or None) over ``x[B, T, C]``."""
        hs, h_last = self.rnn(x, cache)
        return self.resid_dropout(self.c_proj(hs)), h_last


class RNN(LanguageModel):
    """Elman recurrent language model in the GPT's block structure.

    Args:
        vocab_size: Number of distinct tokens (linked from the data; do not set by hand).
        block_size: Training context length. The model itself reads any length.
        n_layer: Number of recurrent blocks.
        n_embd: Width of the residual stream (and of the token embedding).
        n_hidden: Size of each layer's hidden state; defaults to n_embd.
        dropout: Dropout probability on embeddings, recurrence outputs and MLP outputs.
        bias: Use biases in Linear and LayerNorm layers.
        fast: Run the recurrence with the hand-written backward pass instead of
            the plain autograd loop (same result, faster).
    """

    # The recurrence reads any length: block_size is only the length it trains on.
    run_settings = (*LanguageModel.run_settings, "block_size")
    compile_refusal = ("its recurrence is a Python loop over the context (ElmanScan), which torch.compile unrolls "
                       "step by step: on 2 CPU cores 250 s to compile, then 77 ms a step against 61-74 ms eager "
                       "(docs/results.md, \"torch.compile\")")

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 64,
        n_layer: int = 4,
        n_embd: int = 128,
        n_hidden: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        fast: bool = True,
    ):
        super().__init__()
        n_hidden = n_embd if n_hidden is None else n_hidden
        check_positive(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_embd=n_embd, n_hidden=n_hidden)
        check_dropout(dropout)
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.n_embd, self.n_hidden = n_embd, n_hidden
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(n_embd, ElmanMixer(n_embd, n_hidden, dropout, bias, fast), dropout, bias) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        init_gpt2(self, n_layer)
        # Weight tying, as in the GPT: the output head reuses the token embedding.
        self.lm_head.weight = self.wte.weight

    @property
    def max_context(self) -> int | None:
        return None  # the hidden state summarises any amount of past

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)

    def forward_cached(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Stateful step: the cache is the list of each layer's last hidden state ``[B, n_hidden]``.

        A new token costs one step of every layer; the context is never re-read.
        """
        x = self.drop(self.wte(idx))  # (B, T, C)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, h = block.forward_cached(x, None if cache is None else cache[i])
            new_cache.append(h)
        return self.lm_head(self.ln_f(x[:, -1, :])), new_cache


# ----- Faster and exportable variants -----------------------------------------------
# ``elman_scan`` above is the recurrence to read. ``ElmanLayer`` runs one of these in its
# place, same numbers: ``ElmanScan`` to train faster, ``elman_scan_exportable`` under torch.export.


class ElmanScan(torch.autograd.Function):
    """``elman_scan`` with a hand-written backward pass (BPTT): same numbers, less overhead.

    Why it exists: at these sizes a step is two small operations (a [B, H] x [H, H]
    product and a tanh), so autograd's per-step bookkeeping costs as much as the
    arithmetic (docs/results.md, "Elman RNN against torch.nn.RNN"). The forward
    loop runs without autograd recording, in place in one time-major buffer; the
    backward loop keeps only what is truly sequential (the gradient flowing back
    through h_{t-1} W_h^T) and gets dW_h from one matrix product over all steps
    at the end. First-order gradients only.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, w_h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        # Time-major copy of `a` (T, B, H): each step's [B, H] block is contiguous and
        # is overwritten in place, first by z_t = a_t + h_{t-1} W_h^T, then by h_t = tanh(z_t).
        hs = a.transpose(0, 1).clone(memory_format=torch.contiguous_format)
        w_ht = w_h.t()
        h = h0
        for h_t in hs.unbind(0):
            h = h_t.addmm_(h, w_ht).tanh_()
        ctx.save_for_backward(w_h, h0, hs)
        return hs.transpose(0, 1)  # (B, T, H), a view: no copy

    @staticmethod
    def backward(ctx, grad_hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w_h, h0, hs = ctx.saved_tensors
        dtanh = 1.0 - hs * hs  # tanh'(z_t) = 1 - h_t^2, all steps at once, (T, B, H)
        # gz[t] becomes dL/dz_t: the gradient arriving at h_t from the output, plus the
        # one from step t+1, which read h_t through W_h; then times tanh'(z_t).
        gz = grad_hs.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # (T, B, H)
        g = None
        for g_t, dtanh_t in zip(reversed(gz.unbind(0)), reversed(dtanh.unbind(0))):
            if g is not None:
                g_t.addmm_(g, w_h)
            g = g_t.mul_(dtanh_t)
        # Each step used W_h once, with h_{t-1} (h0 for step 0): dW_h = sum_t dz_t^T h_{t-1},
        # one matrix product over all steps instead of T small ones.
        grad_w_h = torch.addmm(gz[0].t() @ h0, gz[1:].flatten(0, 1).t(), hs[:-1].flatten(0, 1))  # (H, H)
        grad_h0 = gz[0] @ w_h  # (B, H)
        return gz.transpose(0, 1), grad_w_h, grad_h0


def elman_scan_exportable(a: torch.Tensor, w_h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """``elman_scan`` for ``torch.export`` (the ONNX exporter), forward only, same arguments and result.

    Why it exists: the exporter would unroll a Python loop into a graph of fixed length,
    while torch's ``scan`` operator stays one loop that ONNX runs for any length.
    ``scan`` is not public in torch 2.13 (tests/test_dependencies.py fails loudly if it moves)."""
    from torch._higher_order_ops.scan import scan

    def step(h: torch.Tensor, a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(a_t + h @ w_h.t())  # (B, H)
        return h, h.clone()  # (carry, output): scan wants them as separate tensors

    return scan(step, h0, a.transpose(0, 1))[1].transpose(0, 1)  # over time-major (T, B, H); back to (B, T, H)
