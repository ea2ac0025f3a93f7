"""GPT: a decoder-only transformer (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners"), in the nanoGPT layout, read top to bottom:
CausalSelfAttention -> MLP -> Block -> GPT. Newer options, all off by default (the GPT
is then GPT-2's), are one line each where they act: rotary positions and QK-norm in the
attention, the embedding shortcut and the logit soft-cap in the GPT.

The RNN and the Backpack are this block with something else in it or around it:
they import ``CausalSelfAttention``, ``MLP`` and ``Block`` from here, and
``layers.py`` keeps only small helpers that are not the architecture.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptnano.errors import ConfigError
from gptnano.models.base import LanguageModel, check_dropout, check_positive
from gptnano.models.layers import Dropout, hand_written_is_faster, init_gpt2


def causal_softmax(q: torch.Tensor, k: torch.Tensor, causal_offset: int = 0) -> torch.Tensor:
    """Attention probabilities of queries ``q[..., Tq, hs]`` over keys ``k[..., Tk, hs]``:
    ``softmax(q k^T / sqrt(hs))`` over the keys each query may see, ``(..., Tq, Tk)``.

    Query i sits at position ``causal_offset + i`` and may look at keys
    ``0 .. causal_offset + i``; the mask sets every later key to -inf before the
    softmax, which is what makes the model causal (those probabilities are exactly 0).
    """
    Tq, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (..., Tq, Tk)
    future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(diagonal=causal_offset + 1)
    return att.masked_fill(future, float("-inf")).softmax(dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021, "RoFormer", arXiv 2104.09864): ``x[..., T, hs]``
    at positions ``offset .. offset + T - 1`` -> the same shape, each pair of dimensions turned by
    an angle proportional to the position.

    Turning the queries by angle m * theta and the keys by n * theta makes the score q_m . k_n a
    function of the distance m - n alone: positions enter attention as relative ones, and the
    token embedding needs no position added. Pair j turns at theta_j = base^(-2j / hs), from
    one radian per position down to slow turns that tell far positions apart. The pairs are
    dimensions (j, j + hs/2) (GPT-NeoX's layout; the paper pairs neighbours 2j, 2j + 1): a fixed
    reordering of the head's dimensions, the same to a trained model.
    """

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        if head_size % 2 != 0:
            raise ConfigError(f"rope needs an even head size (n_embd / n_head), got {head_size}")
        if not base > 0:
            raise ConfigError(f"rope_base must be positive, got {base!r}")
        theta = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
        angle = torch.outer(torch.arange(block_size, dtype=torch.float32), theta)  # (block_size, hs/2)
        # Computed once; not saved (persistent=False): the constructor's arguments fix them.
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.size(-2)
        cos, sin = (t[offset : offset + T].to(x.dtype) for t in (self.cos, self.sin))  # (T, hs/2)
        x1, x2 = x.chunk(2, dim=-1)  # dimension j turns with dimension j + hs/2
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # a 2-D rotation per pair


def rms_norm(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its root mean square over the last dimension, times a learned ``gain``
    (Zhang & Sennrich 2019). The gain in ``x``'s dtype: torch's fused kernel needs both alike."""
    return F.rms_norm(x, gain.shape, gain.to(x.dtype), eps=1e-6)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, written out by hand: ``[B, T, C] -> [B, T, C]``.

    ``use_sdpa=True`` swaps the hand-written lines for ``F.scaled_dot_product_attention``
    (a fused kernel; tests/test_gpt.py proves both equal) wherever that is the faster
    path (``layers.hand_written_is_faster``). ``probabilities`` shows what it attends to.

    Two options act on the queries and keys (the GPT's ``rope`` and ``qk_norm`` say why):
    ``rope``, a ``Rotary`` that turns them by their positions, and ``qk_norm``, an RMS norm
    of each head's query and key with a learned gain per head dimension.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True, use_sdpa: bool = True,
                 rope: Rotary | None = None, qk_norm: bool = False):
        super().__init__()
        if n_embd % n_head != 0:
            raise ConfigError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.use_sdpa = use_sdpa
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # queries, keys and values in one Linear
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = Dropout(dropout)
        self.resid_dropout = Dropout(dropout)
        self.rope = rope
        self.qk_norm = qk_norm
        if qk_norm:  # start as the plain norm; one gain for all heads, like a LayerNorm's over C
            self.q_gain = nn.Parameter(torch.ones(n_embd // n_head))
            self.k_gain = nn.Parameter(torch.ones(n_embd // n_head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding width (n_embd)
        # queries, keys and values of every position, each split into n_head heads of hs = C / n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm: q, k = rms_norm(q, self.q_gain), rms_norm(k, self.k_gain)  # each head's q, k at RMS 1
        if self.rope is not None: q, k = self.rope(q), self.rope(k)  # positions as rotations of q and k
        if self.fused(q):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            att = causal_softmax(q, k)  # (B, nh, T, T): each row a softmax over the positions <= its own
            y = self.attn_dropout(att) @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))  # output projection

    def fused(self, q: torch.Tensor) -> bool:
        """Whether this call takes SDPA: asked for, and not slower than the hand-written lines here."""
        return self.use_sdpa and not hand_written_is_faster(q.device.type, q.dtype, torch.compiler.is_compiling())

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """What each head attends to: ``att[B, n_head, T, T]`` for the block's normalised input
        ``x[B, T, C]``, the softmax ``forward``'s hand-written path computes (QK-norm and rotary
        positions included, when on), without dropout (nothing random is drawn). Row i sums to 1
        over positions 0..i; above the diagonal it is 0."""
        q, k, _ = self.heads(x)
        return causal_softmax(q, k)  # (B, nh, T, T)

    def heads(self, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, ...]:
        """``forward``'s first lines for ``x[B, T, C]`` at positions ``offset .. offset + T - 1``:
        q, k, v, each ``(B, nh, T, hs)``, QK-norm and rotary positions applied where they are on."""
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        if self.qk_norm: q, k = rms_norm(q, self.q_gain), rms_norm(k, self.k_gain)
        if self.rope is not None: q, k = self.rope(q, offset), self.rope(k, offset)
        return q, k, v

    def forward_cached(self, x: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """``forward`` for new positions ``x[B, T, C]`` after the positions whose keys and values
        ``cache`` holds (``(k, v)``, each ``(B, nh, T_past, hs)``, or None). Returns the output and
        the keys and values of all positions so far."""
        B, T, C = x.size()
        offset = 0 if cache is None else cache[0].size(-2)  # positions before x
        q, k, v = self.heads(x, offset)  # the cache holds keys already turned to their own positions
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=-2), torch.cat([cache[1], v], dim=-2)  # (B, nh, offset + T, hs)
        # SDPA's causal mask is square (offset 0); one new token sees every key, no mask needed.
        if self.fused(q) and (offset == 0 or T == 1):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=offset == 0)
        else:
            y = self.attn_dropout(causal_softmax(q, k, causal_offset=offset)) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


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


class Block(nn.Module):
    """Pre-LayerNorm residual block: ``x + mixer(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    The token *mixer* is an argument: causal self-attention in the GPT and the
    Backpack, an Elman recurrence in the RNN. A mixer maps ``[B, T, C] -> [B, T, C]``
    causally and offers ``forward_cached(x, cache) -> (y, cache)`` for generation.
    """

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


class GPT(LanguageModel):
    """Decoder-only transformer language model: token + learned position embeddings,
    ``n_layer`` blocks of causal self-attention and an MLP, a final LayerNorm, and an
    output head tied to the token embedding.

    The options after ``use_sdpa`` are newer than GPT-2, each off by default; with all of
    them off this is GPT-2's network (and ``export --format hf`` writes it as one).
    docs/architectures.md, "Newer GPT options", says what each is for.

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
        rope: Rotary position embedding (Su et al. 2021, "RoFormer: Enhanced Transformer
            with Rotary Position Embedding", arXiv 2104.09864): each head's queries and keys
            are turned by angles proportional to their positions, so attention scores depend
            on relative positions; the learned position embedding (wpe) is then left out.
        rope_base: With rope, the base of the rotation frequencies base^(-2j / head size).
        qk_norm: QK-norm (Henry et al. 2020, "Query-Key Normalization for Transformers",
            arXiv 2010.04245; Dehghani et al. 2023, ViT-22B, arXiv 2302.05442): each head's
            queries and keys are RMS-normalised, with a learned gain per head dimension,
            before their dot product, which bounds the attention scores.
        embed_shortcut: Add the token embedding x0 back into every block's input,
            x + lambda_l * x0, with a learned lambda_l per block starting at 0 (modded-nanogpt,
            Jordan et al. 2024; a special case of DenseFormer's weighted averages,
            Pagliardini et al. 2024, arXiv 2402.02622).
        logit_softcap: Soft-cap the output logits at this value, c * tanh(logits / c), so
            that |logits| < c (Gemma 2, Gemma Team 2024, arXiv 2408.00118; modded-nanogpt).
            None: no cap.
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
        rope: bool = False,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        embed_shortcut: bool = False,
        logit_softcap: float | None = None,
    ):
        super().__init__()
        check_positive(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        check_dropout(dropout)
        if logit_softcap is not None and not logit_softcap > 0:
            raise ConfigError(f"logit_softcap must be positive (or None: no cap), got {logit_softcap!r}")
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.n_embd = n_embd
        self.rope, self.qk_norm, self.embed_shortcut, self.logit_softcap = rope, qk_norm, embed_shortcut, logit_softcap
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = None if rope else nn.Embedding(block_size, n_embd)  # rotary positions replace learned ones
        self.drop = Dropout(dropout)
        rotary = Rotary(n_embd // n_head, block_size, rope_base) if rope else None  # one for all layers
        self.blocks = nn.ModuleList(
            Block(n_embd, CausalSelfAttention(n_embd, n_head, dropout, bias, use_sdpa, rotary, qk_norm), dropout, bias)
            for _ in range(n_layer)
        )
        if embed_shortcut:  # lambda_l: how much of the embedding block l's input gets back; 0 at first
            self.x0_weight = nn.Parameter(torch.zeros(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        init_gpt2(self, n_layer)
        # Weight tying (Press & Wolf 2017): the output head reuses the token
        # embedding, saving vocab_size * n_embd parameters and helping small data.
        self.lm_head.weight = self.wte.weight

    def _embed(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        if self.wpe is None:
            return self.drop(self.wte(idx))  # (B, T, C): positions come from the rotations in attention
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.check_length(idx)
        x = x0 = self._embed(idx, 0)
        for i, block in enumerate(self.blocks):
            if self.embed_shortcut: x = x + self.x0_weight[i] * x0  # the embedding again, a learned amount
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        if self.logit_softcap: logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)  # |logits| < c
        return logits

    def forward_cached(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """KV-cached step. The cache is ``(token history, per-layer (k, v))``.

        Learned positions are absolute, so once the history outgrows
        ``block_size`` the window slides and every position changes: from then
        on each step re-runs the cropped window, exactly like the naive sampler.
        Rotary positions (``rope``) are relative, but the cropped window's first
        token still sees less context than its cached keys were made from, so they
        slide the same way: the model reads at most the ``block_size`` it trained on.
        New keys are turned to their positions, ``start`` on (``CausalSelfAttention.heads``).
        """
        history, kv = (idx, None) if cache is None else (torch.cat([cache[0], idx], dim=1), cache[1])
        start = history.size(1) - idx.size(1)
        if history.size(1) > self.block_size or (kv is None and start > 0):
            return self.naive_last_logits(history), (history, None)
        x = x0 = self._embed(idx, start)
        new_kv = []
        for i, block in enumerate(self.blocks):
            if self.embed_shortcut: x = x + self.x0_weight[i] * x0
            x, layer_kv = block.forward_cached(x, None if kv is None else kv[i])
            new_kv.append(layer_kv)
        logits = self.lm_head(self.ln_f(x[:, -1, :]))  # (B, vocab_size)
        if self.logit_softcap: logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits, (history, new_kv)

    def flops_per_token(self) -> float:
        # 6N for the weights (position lookups are free; the tied head is a real
        # matmul) plus attention's QK^T and AV, 12 * n_layer * T * C (PaLM, appendix B).
        # Rotary positions have no weights; rotations and the soft-cap are element-wise.
        n = self.num_params() - (0 if self.wpe is None else self.wpe.weight.numel())
        return 6.0 * n + 12.0 * self.n_layer * self.block_size * self.n_embd
