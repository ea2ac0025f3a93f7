"""The one contract every gptnano architecture keeps.

A language model maps token ids to next-token logits, and position t may only
look at tokens <= t. Everything else in gptnano (the LightningModule, the
sampler, the tests) is written against this contract and nothing more.
"""

from typing import Any

import torch
from torch import nn

from gptnano.errors import ConfigError


class LanguageModel(nn.Module):
    """Base class of all architectures: ``forward(idx[B, T]) -> logits[B, T, vocab_size]``.

    Subclasses set ``vocab_size`` and ``block_size`` (the training context) and
    implement ``forward``. ``max_context`` is how many past tokens ``forward``
    can take at once: ``block_size`` for models with a fixed context (learned
    positions, a finite receptive field), ``None`` for a recurrent model that
    can read any length.

    Generation goes through ``forward_cached``. The version here is the naive
    one: it keeps the token history as its cache and re-runs ``forward`` on the
    (cropped) history for every new token. Architectures override it with a
    real cache (keys/values, a hidden state, activation queues) so each new
    token costs one step; tests check both give the same logits.
    """

    vocab_size: int
    block_size: int
    # Constructor arguments that do not change what a trained network computes (how it trains,
    # or which kernel computes the same thing): a run started from trained weights
    # (``fit --init_from``) takes them from its own config. The weights fix every other one.
    run_settings: tuple[str, ...] = ("dropout", "use_sdpa", "fast")
    # Why training through torch.compile does not pay for this architecture (None: it does).
    # `fit --model.compile true` refuses such a model in one line, before the first step.
    compile_refusal: str | None = None

    @property
    def max_context(self) -> int | None:
        return self.block_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_length(self, idx: torch.Tensor) -> None:
        """Fixed-context models cannot read more than ``max_context`` tokens at once."""
        if self.max_context is not None and idx.size(1) > self.max_context:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {self.max_context}")

    def forward_cached(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits for the token after ``idx``, given a cache of everything before it.

        Args:
            idx: ``[B, T]`` new tokens (the prompt on the first call, then one token at a time).
            cache: what the previous call returned, or ``None`` to start.

        Returns:
            ``(logits[B, vocab_size] of the last position, new cache)``.
        """
        return self.forward_naive(idx, cache)

    def forward_naive(self, idx: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """The reference every real cache is tested against: the cache is the token history
        and each call re-runs ``forward`` over its (cropped) last ``max_context`` tokens.
        Same arguments and results as ``forward_cached``."""
        history = idx if cache is None else torch.cat([cache, idx], dim=1)
        return self.naive_last_logits(history), history

    def naive_last_logits(self, history: torch.Tensor) -> torch.Tensor:
        """Last-position logits of a full forward pass over the (cropped) history."""
        context = history if self.max_context is None else history[:, -self.max_context :]
        return self(context)[:, -1, :]

    def num_params(self) -> int:
        """Parameter count (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward ~ 3x forward, matmuls only).

        The default counts 6 FLOPs per parameter that takes part in a matrix
        product; architectures add what the count misses (attention scores).
        """
        return 6.0 * self.num_params()


def check_positive(**sizes: int) -> None:
    """Raise a clear ValueError for the first size that is not a positive int."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
