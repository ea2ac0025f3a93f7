"""Text generation shared by every architecture.

``generate`` drives a model's ``forward_cached`` one token at a time, so each
architecture's cache (keys/values, hidden state, activation queues) makes it
fast; ``generate_naive`` re-runs the whole context for every token and is the
reference that the cached path is tested and benchmarked against. ``stream``
is ``generate`` one token at a time, for a caller that shows each token as
soon as it is drawn (``gptnano generate``).
"""

from collections.abc import Callable, Iterator

import torch

from gptnano.errors import UserError
from gptnano.models.base import LanguageModel


def check_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that mean nothing, with a message naming the rule."""
    if max_new_tokens < 0 or temperature < 0:
        raise UserError("need max_new_tokens >= 0 and temperature >= 0")
    if top_k is not None and top_k <= 0 or top_p is not None and not 0 < top_p <= 1:
        raise UserError("need top_k > 0 and 0 < top_p <= 1")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus.

    top-p keeps the smallest set of tokens whose probabilities add up to at
    least ``top_p`` (Holtzman et al. 2019); the most likely token always stays.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already enough
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from ``logits[B, V]``; temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def _tokens(step: Callable, idx: torch.Tensor, max_new_tokens: int, **sampling) -> Iterator[torch.Tensor]:
    """Yield each new token ``[B, 1]`` as it is drawn; ``step(new, cache) -> (logits, cache)``."""
    new, cache = idx, None
    for _ in range(max_new_tokens):
        logits, cache = step(new, cache)
        new = sample_next(logits, **sampling)
        yield new


def _generate(step: Callable, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    return torch.cat([idx, *_tokens(step, idx, max_new_tokens, **sampling)], dim=1)


@torch.inference_mode()
def generate(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``idx[B, T]`` by ``max_new_tokens`` tokens using the model's cache.

    Returns ``[B, T + max_new_tokens]``. Models with a fixed context see only
    their last ``max_context`` tokens, so any length can be generated.
    """
    return _generate(model.forward_cached, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)


@torch.inference_mode()
def generate_naive(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The reference sampler: re-run the model on the whole (cropped) context per token."""
    return _generate(
        LanguageModel.forward_cached.__get__(model), idx, max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
    )


@torch.inference_mode()
def stream(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """``generate``, one token at a time: yields each new token ``[B, 1]`` as soon as
    it is sampled (the same tokens ``generate`` returns after ``idx``, given the same
    generator state). Stop iterating to stop generating."""
    yield from _tokens(model.forward_cached, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
