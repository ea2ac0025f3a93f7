"""Sampling controls: temperature, top-k, top-p."""

import torch

from gptnano.sampling import filter_logits, sample_next


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, False, True]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits[:, [3, 1, 0, 2]], top_p=0.7)).tolist() == [[False, True, True, False]]


def test_samples_respect_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 30).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    drawn = set(sample_next(logits, temperature=2.0, top_k=3, generator=g).flatten().tolist())
    assert drawn == allowed  # all three get drawn at T=2, nothing else does
    nucleus = set(torch.nonzero(torch.isfinite(filter_logits(logits[:1], top_p=0.5))[0]).flatten().tolist())
    drawn = set(sample_next(logits, top_p=0.5, generator=g).flatten().tolist())
    assert drawn <= nucleus and len(nucleus) < 30


def test_temperature_zero_is_greedy():
    logits = torch.randn(4, 10)
    assert torch.equal(sample_next(logits, temperature=0).flatten(), logits.argmax(-1))
