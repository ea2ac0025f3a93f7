"""Pieces two or more architectures share unchanged.

The pre-LayerNorm residual ``Block`` takes its token *mixer* (causal
self-attention for the GPT and the Backpack, a recurrence for the RNN) as an
argument, so the architectures differ only where they really differ.
A mixer maps ``[B, T, C] -> [B, T, C]`` causally and offers
``forward_cached(x, cache) -> (y, cache)`` for generation.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptnano.errors import ConfigError


def init_gpt2(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and residual output
    projections (named ``c_proj``) scaled by 1/sqrt(2 * n_layer) so the residual
    stream's variance does not grow with depth."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        elif p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=0.02)
    for m in module.modules():  # LayerNorm: identity at start
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that is skipped outright when it would do nothing (in eval mode,
    or with p = 0): a no-op ``nn.Dropout`` still dispatches an operator, a noticeable
    share of a cached token's time during generation (docs/results.md, "Generation")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.training and self.p > 0 else x


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(C, 4C) -> GELU -> Linear(4C, n_out) -> dropout.

    ``n_out`` is C (the residual width) unless a caller widens the output, as the
    Backpack's sense network does to emit all of a token's sense vectors at once.
    """

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True, n_out: int | None = None):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_out or n_embd, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal_offset: int) -> torch.Tensor:
    """Softmax attention weights of queries ``q[..., Tq, hs]`` over keys ``k[..., Tk, hs]``.

    Query i sits at position ``causal_offset + i`` and may look at keys
    ``0 .. causal_offset + i``; the mask sets every later key to -inf before the
    softmax, which is what makes the model causal.
    """
    Tq, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (..., Tq, Tk)
    future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(diagonal=causal_offset + 1)
    return att.masked_fill(future, float("-inf")).softmax(dim=-1)


def hand_written_is_faster(device_type: str, dtype: torch.dtype, compiling: bool) -> bool:
    """Where the hand-written attention beats ``F.scaled_dot_product_attention``: on the CPU
    only. In bf16 there, SDPA's bf16 kernel is slower than its fp32 one at these head sizes,
    and SDPA in fp32 (casting q, k, v up) costs the step more than bf16 products around a
    softmax that accumulates in fp32; under torch.compile the hand-written lines fuse into
    a few kernels (measurements: docs/results.md, "Training speed"). On a GPU, SDPA's
    flash / memory-efficient kernels never build the (B, H, T, T) matrix: always SDPA there."""
    return device_type == "cpu" and (dtype == torch.bfloat16 or compiling)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, written out by hand.

    ``use_sdpa=True`` swaps the three lines of attention arithmetic for
    ``F.scaled_dot_product_attention`` (a fused kernel); a test proves both give
    the same result. Queries, keys and values come from one fused Linear.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True, use_sdpa: bool = True):
        super().__init__()
        if n_embd % n_head != 0:
            raise ConfigError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.use_sdpa = use_sdpa
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = Dropout(dropout)
        self.resid_dropout = Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def _attend(self, q, k, v, causal_offset: int) -> torch.Tensor:
        if self.use_sdpa and not hand_written_is_faster(q.device.type, q.dtype, torch.compiler.is_compiling()):
            p = self.dropout if self.training else 0.0
            if causal_offset == 0 and q.size(-2) == k.size(-2):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            if q.size(-2) == 1:  # one new token sees every cached key
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        att = attention_weights(q, k, causal_offset)  # (B, nh, Tq, Tk)
        return self.attn_dropout(att) @ v  # (B, nh, Tq, hs)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, nh, T, hs = y.shape
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        return self._merge(self._attend(q, k, v, causal_offset=0))

    def forward_cached(self, x: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Attention for new positions ``x`` given the keys/values of earlier ones."""
        q, k, v = self._heads(x)
        offset = 0
        if cache is not None:
            past_k, past_v = cache
            offset = past_k.size(-2)
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        return self._merge(self._attend(q, k, v, causal_offset=offset)), (k, v)


class Block(nn.Module):
    """Pre-LayerNorm residual block: ``x + mixer(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, mixer: nn.Module, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.mixer = mixer
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        y, cache = self.mixer.forward_cached(self.ln_1(x), cache)
        x = x + y
        return x + self.mlp(self.ln_2(x)), cache
