"""Backpack language model (Hewitt, Thickstun, Manning & Liang 2023, "Backpack
Language Models", arXiv 2305.16765). Every token carries n_senses context-free
sense vectors; a small causal transformer (the GPT's blocks, imported from gpt.py)
only decides how much of each past token's senses to add up, so each prediction is a
linear, inspectable mix of senses.
"""

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gptnano.errors import ConfigError
from gptnano.models.base import LanguageModel, check_dropout, check_positive
from gptnano.models.gpt import MLP, Block, CausalSelfAttention, causal_softmax
from gptnano.models.layers import Dropout, init_gpt2


class SenseNetwork(nn.Module):
    """Context-free senses C(x), as the paper's reference implementation computes them::

        r1 = e + LN0(e)              # a GPT block whose attention is the identity
        r2 = r1 + MLP(LN1(r1))
        C(x) = FinalMLP(LN2(r2))     # Linear(C, 4C) -> GELU -> Linear(4C, n_senses * C)

    ``e`` is the token's embedding, ``(..., C)``; the output is ``(..., n_senses, C)``.
    It sees one token at a time (no position, no neighbours), so a token's senses are
    the same wherever it occurs: that is what makes them inspectable, and what the
    control experiments edit. Dropout sits where the reference's does: on ``e``, on
    LN0's output before it is added, on the MLP's output; never on the senses.
    """

    def __init__(self, n_embd: int, n_senses: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.n_senses = n_senses
        self.drop = Dropout(dropout)
        self.ln_0 = nn.LayerNorm(n_embd, bias=bias)
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.final_mlp = MLP(n_embd, 0.0, bias, n_out=n_senses * n_embd)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        e = self.drop(e)
        # The reference builds this from a pre-LN GPT block with its attention replaced by
        # the identity, so the normalised embedding itself is what gets added to the residual.
        x = e + self.drop(self.ln_0(e))
        x = x + self.mlp(self.ln_1(x))
        senses = self.final_mlp(self.ln_2(x))  # (..., n_senses * C)
        return senses.unflatten(-1, (self.n_senses, -1))  # (..., n_senses, C)


class BackpackCache(NamedTuple):
    """What ``forward_cached`` keeps between steps (``kv is None`` after the naive fallback)."""

    history: torch.Tensor  # (B, T) every token so far
    kv: list | None  # contextualization transformer: per layer (k, v), each (B, n_head, T, hs)
    sense_keys: torch.Tensor | None  # (B, n_senses, T, n_embd // n_senses): keys of the alpha heads
    senses: torch.Tensor | None  # (B, T, n_senses, C): sense vectors of every past token


class Backpack(LanguageModel):
    """Backpack LM: logits_i = E (sum_j sum_l alpha[l, i, j] C(x_j)[l]).

    One token embedding E is shared three ways, as in the paper's reference code:
    input of the sense network, input (plus learned positions) of the
    contextualization transformer (the GPT's blocks), and the tied output head (the
    paper's logits = E o). The defaults are sized like the CPU GPT (configs/backpack.yaml);
    how this code differs from the reference implementation, on purpose, is listed in
    docs/architectures.md, "Differences from the reference implementations".

    Args:
        vocab_size: Number of distinct tokens (linked from the data; do not set by hand).
        block_size: Context length: the most tokens the model sees at once.
        n_layer: Transformer blocks in the contextualization network.
        n_head: Attention heads per block; must divide n_embd.
        n_embd: Width of embeddings, sense vectors and the contextualization network.
        n_senses: Sense vectors per token, and alpha heads of n_embd // n_senses dimensions each.
        dropout: Dropout probability in the contextualization and sense networks.
        bias: Use biases in Linear and LayerNorm layers.
        use_sdpa: Contextualization attention through torch's fused kernel (same result;
            not on the CPU under bf16 or torch.compile, where the hand-written lines are faster).
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 80,
        n_senses: int = 16,
        dropout: float = 0.0,
        bias: bool = True,
        use_sdpa: bool = True,
    ):
        super().__init__()
        sizes = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        check_positive(**sizes, n_senses=n_senses)
        check_dropout(dropout)
        if n_senses > n_embd:
            raise ConfigError(f"n_senses ({n_senses}) must be <= n_embd ({n_embd}): each alpha head needs a dimension")
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.n_embd, self.n_senses = n_embd, n_senses
        self.sense_head_size = n_embd // n_senses  # the alpha heads split the width, like attention heads
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = Dropout(dropout)
        self.sense_net = SenseNetwork(n_embd, n_senses, dropout, bias)
        self.blocks = nn.ModuleList(
            Block(n_embd, CausalSelfAttention(n_embd, n_head, dropout, bias, use_sdpa), dropout, bias)
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.sense_qk = nn.Linear(n_embd, 2 * n_senses * self.sense_head_size, bias=bias)  # alpha queries and keys
        # Multiplies sense l's contribution: ones for normal use; set an entry to 0
        # (see ``scaled_sense``) to remove a sense. Not saved: it is an experiment, not a weight.
        self.register_buffer("sense_scale", torch.ones(n_senses), persistent=False)
        init_gpt2(self, n_layer)

    def sense_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """C(x): ``(B, T)`` token ids -> ``(B, T, n_senses, C)`` context-free sense vectors."""
        return self.sense_net(self.wte(idx))

    def _embed(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)

    def _sense_qk(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = h.shape
        q, k = self.sense_qk(h).chunk(2, dim=2)
        # (B, T, n_senses * hs) -> (B, n_senses, T, hs): one small attention head per sense
        return tuple(t.view(B, T, self.n_senses, self.sense_head_size).transpose(1, 2) for t in (q, k))

    def sense_weights(self, idx: torch.Tensor) -> torch.Tensor:
        """alpha: ``(B, n_senses, T, T)``; row i is a softmax over the positions j <= i."""
        x = self._embed(idx, 0)
        for block in self.blocks:
            x = block(x)
        return self.alpha(self.ln_f(x))

    def alpha(self, h: torch.Tensor) -> torch.Tensor:
        """alpha from the contextualization network's final normalised states ``h[B, T, C]``:
        ``(B, n_senses, T, T)``, one softmax per sense over the positions j <= i (nothing random
        is drawn, so a probe may recompute it)."""
        q, k = self._sense_qk(h)
        return causal_softmax(q, k, causal_offset=0)

    def _logits(self, alpha: torch.Tensor, senses: torch.Tensor) -> torch.Tensor:
        alpha = alpha * self.sense_scale.view(1, -1, 1, 1)  # (B, n_senses, Tq, Tk)
        # o_i = sum_j sum_l alpha[l, i, j] C(x_j)[l]. No LayerNorm afterwards: the
        # output stays a plain weighted sum of senses, which is what makes it editable.
        o = torch.einsum("blij,bjlc->bic", alpha, senses)  # (B, Tq, C)
        return F.linear(o, self.wte.weight)  # tied output head: (B, Tq, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.check_length(idx)
        return self._logits(self.sense_weights(idx), self.sense_vectors(idx))

    def forward_cached(
        self, idx: torch.Tensor, cache: BackpackCache | None = None
    ) -> tuple[torch.Tensor, BackpackCache]:
        """One step per new token: the transformer's keys/values, the alpha heads'
        keys and the senses of all past tokens are cached, since the new alpha row
        weighs every past position. Beyond block_size the learned positions slide,
        so from then on each step re-runs the cropped window, like the GPT."""
        if cache is None:
            cache = BackpackCache(idx[:, :0], None, None, None)
        history = torch.cat([cache.history, idx], dim=1)
        start = cache.history.size(1)
        if history.size(1) > self.block_size or (cache.kv is None and start > 0):
            return self.naive_last_logits(history), BackpackCache(history, None, None, None)
        x, kv = self._embed(idx, start), []
        for i, block in enumerate(self.blocks):
            x, layer_kv = block.forward_cached(x, None if cache.kv is None else cache.kv[i])
            kv.append(layer_kv)
        q, k = self._sense_qk(self.ln_f(x))
        senses = self.sense_vectors(idx)
        if start > 0:
            k, senses = torch.cat([cache.sense_keys, k], dim=2), torch.cat([cache.senses, senses], dim=1)
        alpha = causal_softmax(q[:, :, -1:], k, causal_offset=history.size(1) - 1)  # (B, n_senses, 1, T)
        return self._logits(alpha, senses)[:, -1, :], BackpackCache(history, kv, k, senses)

    def sense_logits(self, token_id: int) -> torch.Tensor:
        """What each sense of a token says on its own: ``C(token)[l] @ E^T``, shape ``(n_senses, vocab_size)``."""
        idx = torch.tensor([[token_id]], device=self.wte.weight.device)
        return F.linear(self.sense_vectors(idx)[0, 0], self.wte.weight)

    @contextmanager
    def scaled_sense(self, sense: int, scale: float = 0.0):
        """Inside the ``with`` block sense ``sense`` counts ``scale`` times (0 removes it), e.g.
        ``with model.scaled_sense(3): generate(model, ...)`` -- the paper's control experiments."""
        saved = self.sense_scale.clone()
        self.sense_scale[sense] = scale
        try:
            yield self
        finally:
            self.sense_scale.copy_(saved)

    def flops_per_token(self) -> float:
        # 6N for the weights (position lookups are free; the sense network runs at
        # every position, so its Linears count like the transformer's), the
        # contextualization attention as in the GPT, the alpha heads' scores (QK^T
        # only) and the weighted sum of T * n_senses sense vectors.
        T, C = self.block_size, self.n_embd
        n = self.num_params() - self.wpe.weight.numel()
        return 6.0 * n + 12.0 * self.n_layer * T * C + 6.0 * T * self.n_senses * (self.sense_head_size + C)
