"""Causal convolutional language model in the style of WaveNet (van den Oord et
al. 2016, "WaveNet: A Generative Model for Raw Audio", arXiv 1609.03499) and
makemore part 5: stacked dilated causal 1-D convolutions in residual blocks,
dilations doubling layer by layer so the receptive field grows exponentially.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptnano.errors import ConfigError
from gptnano.models.base import LanguageModel, check_dropout, check_positive
from gptnano.models.layers import Dropout, init_gpt2


def dilation_schedule(n_layer: int, kernel_size: int, block_size: int) -> list[int]:
    """Dilations 1, 2, 4, ... up to the first cycle whose receptive field covers
    ``block_size``, then the cycle repeats (WaveNet's 1..512, 1..512, ...)."""
    cycle = 1
    while 1 + (kernel_size - 1) * (2**cycle - 1) < block_size and kernel_size > 1:
        cycle += 1
    return [2 ** (i % cycle) for i in range(n_layer)]


class CausalConv1d(nn.Module):
    """Dilated causal convolution: ``y[t] = b + sum_k W[:, :, k] @ x[t - (K-1-k) * dilation]``.

    Causality comes from padding ``dilation * (K - 1)`` zeros on the *left* only,
    so output t never reads an input after t. Works on ``[B, T, C]`` like the
    rest of the model and transposes to the ``[B, C, T]`` layout F.conv1d wants.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, bias: bool = True):
        super().__init__()
        self.dilation = dilation
        self.pad = dilation * (kernel_size - 1)  # how far back the kernel reaches
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.transpose(1, 2), (self.pad, 0))  # (B, C_in, pad + T): zeros before the start
        return F.conv1d(x, self.weight, self.bias, dilation=self.dilation).transpose(1, 2)  # (B, T, C_out)

    def forward_cached(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolve new inputs ``x[B, T, C]`` given the queue of the last ``pad`` inputs.

        The queue starts as zeros, the same zeros ``forward`` pads with, and only
        ever holds the ``dilation * (K - 1)`` inputs the kernel can still reach.
        """
        if cache is None:
            cache = x.new_zeros(x.size(0), self.pad, x.size(2))
        window = torch.cat([cache, x], dim=1)  # (B, pad + T, C_in)
        if x.size(1) == 1:
            # One new token: the kernel's K taps are every dilation-th row of the window,
            # so the step is one small matmul (F.conv1d's setup costs far more than the arithmetic here).
            taps = window[:, :: self.dilation].flatten(1)  # (B, K * C_in)
            y = F.linear(taps, self.weight.permute(0, 2, 1).flatten(1), self.bias)[:, None]  # (B, 1, C_out)
        else:
            y = F.conv1d(window.transpose(1, 2), self.weight, self.bias, dilation=self.dilation).transpose(1, 2)
        return y, window[:, window.size(1) - self.pad :]


class ConvBlock(nn.Module):
    """Pre-LayerNorm residual block: ``x + proj(gelu(causal_conv(ln(x))))``.

    The conv mixes time and widens to 2C, the 1x1 ``c_proj`` mixes channels
    back to C, like a transformer MLP whose first layer also looks back in time.
    GELU + LayerNorm rather than WaveNet's gated tanh * sigmoid: it ended lower in every
    seed of a small ablation at equal speed and slightly fewer parameters, and the
    LayerNorm is what matters most (numbers: docs/results.md, "The CNN's block").
    """

    def __init__(self, n_embd: int, kernel_size: int, dilation: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd, bias=bias)
        self.conv = CausalConv1d(n_embd, 2 * n_embd, kernel_size, dilation, bias)
        self.c_proj = nn.Linear(2 * n_embd, n_embd, bias=bias)
        self.drop = Dropout(dropout)

    def _residual(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.c_proj(F.gelu(h)))  # h: (B, T, 2C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual(x, self.conv(self.ln(x)))

    def forward_cached(self, x: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        h, cache = self.conv.forward_cached(self.ln(x), cache)
        return self._residual(x, h), cache


class CNN(LanguageModel):
    """Causal convolutional language model (no attention, no positional embedding).

    Args:
        vocab_size: Number of distinct tokens (linked from the data; do not set by hand).
        block_size: Context length during training; the receptive field must cover it.
        n_layer: Number of residual conv blocks; dilations go 1, 2, 4, ... and
            restart once one cycle covers block_size.
        n_embd: Channels of the residual stream.
        kernel_size: Taps per convolution (2 as in WaveNet, or 3).
        dropout: Dropout probability on embeddings and residual branches.
        bias: Use biases in convolutions, Linear and LayerNorm layers.
        tie_weights: Share the output head with the token embedding.
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 64,
        n_layer: int = 6,
        n_embd: int = 144,
        kernel_size: int = 2,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
    ):
        super().__init__()
        check_positive(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_embd=n_embd, kernel_size=kernel_size
        )
        check_dropout(dropout)
        self.vocab_size, self.block_size, self.tie_weights = vocab_size, block_size, tie_weights
        self.dilations = dilation_schedule(n_layer, kernel_size, block_size)
        self.receptive_field = 1 + (kernel_size - 1) * sum(self.dilations)
        if self.receptive_field < block_size:
            raise ConfigError(
                f"receptive field {self.receptive_field} (n_layer={n_layer}, kernel_size={kernel_size}, "
                f"dilations {self.dilations}) is smaller than block_size={block_size}, so late positions "
                f"could not see the whole context: raise n_layer or kernel_size, or lower block_size"
            )
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(ConvBlock(n_embd, kernel_size, d, dropout, bias) for d in self.dilations)
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        init_gpt2(self, n_layer)
        if tie_weights:  # as in the GPT: the head reuses the embedding (Press & Wolf 2017)
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.check_length(idx)
        x = self.drop(self.wte(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)

    def forward_cached(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """One conv step per layer per new token. Cache: ``(last block_size tokens, per-layer queues)``.

        The naive reference crops the history to its last block_size tokens and
        pads zeros before them. The last position only reads its receptive field,
        so while receptive_field <= block_size (the default: 64 == 64) that crop
        changes nothing and the queues can stream forever. With a larger receptive
        field the crop's zero padding does reach the last position, so once the
        history outgrows block_size we re-run the cropped window, as the naive path does.
        """
        history, queues = (idx, None) if cache is None else (torch.cat([cache[0], idx], dim=1), cache[1])
        slid = history.size(1) > self.block_size and self.receptive_field > self.block_size
        if slid or (cache is not None and queues is None):
            return self.naive_last_logits(history), (history[:, -self.block_size :], None)
        x = self.drop(self.wte(idx[:, -self.block_size :]))  # a longer prompt: only the last RF tokens matter
        new_queues = []
        for i, block in enumerate(self.blocks):
            x, queue = block.forward_cached(x, None if queues is None else queues[i])
            new_queues.append(queue)
        return self.lm_head(self.ln_f(x[:, -1, :])), (history[:, -self.block_size :], new_queues)

    def flops_per_token(self) -> float:
        # Every weight is a matmul per token (a conv is K matmuls), except the
        # embedding lookup when the head is not tied to it.
        lookup = 0 if self.tie_weights else self.wte.weight.numel()
        return 6.0 * (self.num_params() - lookup)
