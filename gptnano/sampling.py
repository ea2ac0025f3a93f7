"""Text generation shared by every architecture.

``generate`` drives a model's ``forward_cached`` one token at a time, so each
architecture's cache (keys/values, hidden state, activation queues) makes it
fast; ``generate_naive`` re-runs the whole context for every token and is the
reference that the cached path is tested and benchmarked against.
"""

from collections.abc import Callable

import torch

from gptnano.models.base import LanguageModel


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


def _generate(step: Callable, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    out = [idx]
    new, cache = idx, None
    for _ in range(max_new_tokens):
        logits, cache = step(new, cache)
        new = sample_next(logits, **sampling)
        out.append(new)
    return torch.cat(out, dim=1)


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
