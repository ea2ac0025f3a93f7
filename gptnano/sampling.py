"""Text generation shared by every architecture: one streaming core, thin wrappers.

``stream`` drives a model one token at a time and yields each token as soon as it is
drawn; by default it steps through the model's ``forward_cached``, so each
architecture's cache (keys/values, hidden state, activation queues) makes a token cost
one step. ``generate`` collects what ``stream`` yields; ``generate_naive`` does the same
through ``forward_naive``, which re-runs the whole context for every token: the
reference the cached path is tested and benchmarked against.
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


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from ``logits[B, V]``; returns ``[B, 1]``. Temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.inference_mode()
def stream(model: LanguageModel, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
           step: Callable | None = None) -> Iterator[torch.Tensor]:
    """Continue ``idx[B, T]``, yielding each new token ``[B, 1]`` as soon as it is sampled.

    ``step(new_tokens, cache) -> (logits[B, V], cache)`` is the model's ``forward_cached``
    unless given. Models with a fixed context see only their last ``max_context`` tokens,
    so any length can be generated. Stop iterating to stop generating.
    """
    step = step or model.forward_cached
    new, cache = idx, None
    for _ in range(max_new_tokens):
        logits, cache = step(new, cache)
        new = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield new


@torch.inference_mode()
def generate(model: LanguageModel, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """``idx[B, T]`` followed by what ``stream`` draws: ``[B, T + max_new_tokens]``. ``sampling`` is
    ``stream``'s keywords (temperature, top_k, top_p, generator)."""
    return torch.cat([idx, *stream(model, idx, max_new_tokens, **sampling)], dim=1)


def generate_naive(model: LanguageModel, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """``generate`` through the reference ``forward_naive``: the whole (cropped) context per token."""
    return generate(model, idx, max_new_tokens, step=model.forward_naive, **sampling)
