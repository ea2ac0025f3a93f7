"""GPT: a decoder-only transformer (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners"), in the nanoGPT layout: token + learned
position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU
MLP, a final LayerNorm, and an output head tied to the token embedding.
"""

from typing import Any

import torch
from torch import nn

from gptnano.models.base import LanguageModel, check_dropout, check_positive
from gptnano.models.layers import Block, CausalSelfAttention, Dropout, init_gpt2


class GPT(LanguageModel):
    """Decoder-only transformer language model.

    Args:
        vocab_size: Number of distinct tokens (linked from the data; do not set by hand).
        block_size: Context length: the most tokens the model sees at once.
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide n_embd.
        n_embd: Width of the residual stream.
        dropout: Dropout probability on embeddings, attention weights and residual branches.
        bias: Use biases in Linear and LayerNorm layers (GPT-2 does).
        use_sdpa: Compute attention with torch's fused scaled_dot_product_attention
            instead of the hand-written softmax(QK^T/sqrt(d))V (same result). On the CPU
            under bf16 or torch.compile the hand-written lines run either way: they are
            the faster path there (layers.hand_written_is_faster).
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        use_sdpa: bool = True,
    ):
        super().__init__()
        check_positive(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        check_dropout(dropout)
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.n_embd = n_embd
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(n_embd, CausalSelfAttention(n_embd, n_head, dropout, bias, use_sdpa), dropout, bias)
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        init_gpt2(self, n_layer)
        # Weight tying (Press & Wolf 2017): the output head reuses the token
        # embedding, saving vocab_size * n_embd parameters and helping small data.
        self.lm_head.weight = self.wte.weight

    def _embed(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.check_length(idx)
        x = self._embed(idx, 0)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)

    def forward_cached(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """KV-cached step. The cache is ``(token history, per-layer (k, v))``.

        Learned positions are absolute, so once the history outgrows
        ``block_size`` the window slides and every position changes: from then
        on each step re-runs the cropped window, exactly like the naive sampler.
        """
        history, kv = (idx, None) if cache is None else (torch.cat([cache[0], idx], dim=1), cache[1])
        start = history.size(1) - idx.size(1)
        if history.size(1) > self.block_size or (kv is None and start > 0):
            return self.naive_last_logits(history), (history, None)
        x = self._embed(idx, start)
        new_kv = []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block.forward_cached(x, None if kv is None else kv[i])
            new_kv.append(layer_kv)
        return self.lm_head(self.ln_f(x[:, -1, :])), (history, new_kv)

    def flops_per_token(self) -> float:
        # 6N for the weights (position lookups are free; the tied head is a real
        # matmul) plus attention's QK^T and AV, 12 * n_layer * T * C (PaLM, appendix B).
        n = self.num_params() - self.wpe.weight.numel()
        return 6.0 * n + 12.0 * self.n_layer * self.block_size * self.n_embd
