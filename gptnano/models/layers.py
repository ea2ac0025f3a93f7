"""Small helpers the architectures use that are not themselves architecture: GPT-2's
initialisation, a Dropout that skips itself when it would do nothing, and where the
hand-written attention is faster than the fused kernel. The shared architecture (causal
self-attention, the MLP, the pre-LayerNorm ``Block``) is the GPT's, in ``gpt.py``.
"""

import math

import torch
from torch import nn


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


def hand_written_is_faster(device_type: str, dtype: torch.dtype, compiling: bool) -> bool:
    """Where the hand-written attention beats ``F.scaled_dot_product_attention``: on the CPU
    only. In bf16 there, SDPA's bf16 kernel is slower than its fp32 one at these head sizes,
    and SDPA in fp32 (casting q, k, v up) costs the step more than bf16 products around a
    softmax that accumulates in fp32; under torch.compile the hand-written lines fuse into
    a few kernels (measurements: docs/results.md, "Training speed"). On a GPU, SDPA's
    flash / memory-efficient kernels never build the (B, H, T, T) matrix: always SDPA there."""
    return device_type == "cpu" and (dtype == torch.bfloat16 or compiling)
