"""Muon + AdamW in one optimizer (gptnano/train/optim.py): the orthogonalisation, the
update rules against torch's own optimizers, and which parameters go where."""

import copy

import pytest
import torch
from torch import nn

from gptnano.models import MODELS
from gptnano.train import optim
from gptnano.train.optim import NS_COEFFICIENTS, MuonAdamW, muon_matrices, orthogonalize


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (3, 24, 24)])
def test_orthogonalize_keeps_singular_vectors_and_flattens_singular_values(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = orthogonalize(g).double()
    assert out.shape == g.shape and out.dtype == g.dtype
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    # In g's own singular basis the result is (close to) diagonal, with values near 1:
    # same singular vectors, singular values flattened into roughly [0.7, 1.2].
    core = u.mT @ out @ vh.mT
    diag = torch.diagonal(core, dim1=-2, dim2=-1)
    assert diag.min() > 0.6 and diag.max() < 1.3, diag
    off = core - torch.diag_embed(diag)
    assert off.abs().max() < 0.05
    assert s.max() / s.min() > 3  # the input was far from orthogonal


def _quintic_five_times(s: torch.Tensor) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    return s


def _spectra(shape, generator):
    """Stacks of matrices whose singular values the tests choose: Gaussian (a flat spectrum), and
    singular values from 1 down to 1e-6 (a gradient's is steep: the hard case for rounding)."""
    gauss = torch.randn(*shape, generator=generator, dtype=torch.float64)
    n, m, k = shape
    r = min(m, k)
    u = torch.linalg.qr(torch.randn(n, m, r, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, r, generator=generator, dtype=torch.float64))[0]
    steep = u @ torch.diag_embed(torch.logspace(0, -6, r, dtype=torch.float64).expand(n, r)) @ v.mT
    return {"gaussian": gauss.float(), "steep": steep.float()}


@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("shape", [(4, 32, 128), (4, 96, 32), (4, 48, 48)])
def test_orthogonalize_is_the_quintic_on_the_singular_values(shape, gram):
    """The documented distance to the polar factor: in fp32 the result is ``U f^5(S) V^T`` for
    ``g = U S V^T`` normalised by its Frobenius norm (f the quintic), to 1e-4, in both
    arithmetics (plain and Gram, whatever the shape); so every singular value s >= 0.002
    comes out in [0.68, 1.21] and the result is within 0.32 of ``U V^T`` (spectral norm)
    there; smaller ones are scaled by at most 3.4445^5."""
    for name, g in _spectra(shape, torch.Generator().manual_seed(0)).items():
        u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
        s = s / g.double().norm(dim=(-2, -1), keepdim=True)[..., 0]
        out = orthogonalize(g, dtype=torch.float32, gram=gram).double()
        expected = u @ torch.diag_embed(_quintic_five_times(s)) @ vh
        assert torch.linalg.matrix_norm(out - expected, ord=2).max() < 1e-4, name
        flat = _quintic_five_times(s[s >= 0.002])
        assert flat.min() > 0.68 and flat.max() < 1.21
        if s.min() >= 0.002:  # the Gaussian stacks: every direction is orthogonalised
            assert torch.linalg.matrix_norm(out - u @ vh, ord=2).max() < 0.32, name


@pytest.mark.parametrize("shape", [(4, 32, 128), (4, 96, 32), (4, 48, 48)])
def test_bf16_orthogonalisation_stays_within_its_rounding_in_both_arithmetics(shape):
    """In bf16 the Gram form is as far from the exact quintic as the plain iteration is (the
    error is bf16's rounding, 0.1-0.2 in the spectral norm for a steep spectrum, not the form's)."""
    for name, g in _spectra(shape, torch.Generator().manual_seed(1)).items():
        u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
        s = s / g.double().norm(dim=(-2, -1), keepdim=True)[..., 0]
        expected = u @ torch.diag_embed(_quintic_five_times(s)) @ vh
        plain, gram = (orthogonalize(g, dtype=torch.bfloat16, gram=form).double() for form in (False, True))
        errors = [torch.linalg.matrix_norm(x - expected, ord=2).max().item() for x in (plain, gram)]
        assert errors[1] < max(0.25, 1.5 * errors[0]), (name, errors)
        assert torch.linalg.svdvals(gram).max() < 1.25, name


def test_the_gram_form_restarts_or_bf16_rounding_blows_up(monkeypatch):
    """Why ``gram_newton_schulz`` restarts: without it, bf16 rounding in ``R = X X^T`` grows into
    singular values of ~100 on a steep spectrum; with it, they stay at the quintic's ~1.2."""
    g = _spectra((4, 32, 128), torch.Generator().manual_seed(2))["steep"]
    assert torch.linalg.svdvals(orthogonalize(g, dtype=torch.bfloat16, gram=True).float()).max() < 1.25
    monkeypatch.setattr(optim, "GRAM_RESTART", 99)
    assert torch.linalg.svdvals(orthogonalize(g, dtype=torch.bfloat16, gram=True).float()).max() > 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batched_orthogonalisation_equals_one_matrix_at_a_time(dtype):
    """A stack is orthogonalised as its matrices one by one would be, to the bit (CPU): the
    batched products do per matrix what the single ones do, and each matrix has its own norm."""
    gen = torch.Generator().manual_seed(3)
    for shape in [(5, 24, 72), (5, 72, 24), (4, 32, 32)]:
        g = torch.randn(*shape, generator=gen)
        g[0] *= 1000  # a matrix of another scale changes nothing for the others
        batched = orthogonalize(g, dtype=dtype)
        assert torch.equal(batched, torch.stack([orthogonalize(m, dtype=dtype) for m in g]))


def test_a_step_batched_by_shape_equals_one_matrix_at_a_time():
    """The optimizer stacks the matrices of one shape (tall ones transposed to join the wide ones
    of the same size) into one orthogonalisation: its step equals the step that orthogonalises each
    matrix alone (each in its own group), to the bit."""
    shapes = [(24, 8), (8, 24), (24, 8), (8, 8), (8, 8), (16, 8)]
    together, alone = _copies(2, shapes)
    batched = MuonAdamW([{"params": together, "muon": True, "lr": 0.02, "weight_decay": 0.01}], ns_dtype=torch.float32)
    single = MuonAdamW([{"params": [p], "muon": True, "lr": 0.02, "weight_decay": 0.01} for p in alone],
                       ns_dtype=torch.float32)
    for step in range(3):
        for params in (together, alone):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + 1) + i)
        batched.step(), single.step()
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


def _copies(n, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(*s, generator=gen) for s in shapes]
    return [[nn.Parameter(t.clone()) for t in base] for _ in range(n)]


class ReferenceMuon:
    """Muon written out step by step from its definition (Jordan et al. 2024), one matrix at a
    time, in fp32: the reference on every torch this project supports (torch.optim.Muon
    arrived in torch 2.9). p -= lr * wd * p; buf = mu buf + (1 - mu) g; u = g + mu (buf - g)
    (Nesterov); p -= lr * sqrt(max(1, rows / cols)) * NS5(u)."""

    def __init__(self, params, lr, weight_decay, momentum=0.95):
        self.params, self.lr, self.wd, self.mu = params, lr, weight_decay, momentum
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        a, b, c = 3.4445, -4.7750, 2.0315
        for p, buf in zip(self.params, self.bufs):
            buf.mul_(self.mu).add_(p.grad, alpha=1 - self.mu)
            u = p.grad + self.mu * (buf - p.grad)
            x = u.T if u.shape[0] > u.shape[1] else u
            x = x / x.norm().clamp(min=1e-7)
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            x = x.T if u.shape[0] > u.shape[1] else x
            p.mul_(1 - self.lr * self.wd)
            p.add_(x, alpha=-self.lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


def _muon_reference(name, params, **kw):
    if name == "reference":
        return ReferenceMuon(params, **kw)
    if not hasattr(torch.optim, "Muon"):
        pytest.skip(f"torch.optim.Muon arrived in torch 2.9; this is torch {torch.__version__} "
                    "(the written-out reference still runs)")
    return torch.optim.Muon(params, **kw)


@pytest.mark.parametrize("reference", ["reference", "torch.optim.Muon"])
@pytest.mark.parametrize("fused", [False, True])
def test_steps_equal_muon_and_adamw(fused, reference):
    """Matrices in the Muon group step exactly like Muon (written out here, and torch's own
    where it exists); the rest exactly like torch.optim.AdamW. The orthogonalisation runs in the
    reference's dtype (fp32 written out; torch's always bf16), so they agree to float32 rounding:
    against torch's, op for op (``gram=False``); against the written-out fp32 one, the Gram form
    (the default for these long matrices) agrees as well."""
    mats_a, mats_b = _copies(2, [(24, 8), (8, 24), (24, 8), (8, 8)])
    vecs_a, vecs_b = _copies(2, [(8,), (24, 8)], seed=1)
    ours = MuonAdamW([{"params": mats_a, "muon": True, "lr": 0.02, "weight_decay": 0.01},
                      {"params": vecs_a, "weight_decay": 0.1}], lr=1e-3, betas=(0.9, 0.99),
                     ns_dtype=torch.float32 if reference == "reference" else torch.bfloat16, fused=fused,
                     gram=None if reference == "reference" else False)
    muon = _muon_reference(reference, mats_b, lr=0.02, weight_decay=0.01, momentum=0.95)
    adamw = torch.optim.AdamW(vecs_b, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(4):
        for params in (mats_a + vecs_a, mats_b + vecs_b):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + 1) + i)
        ours.step(), muon.step(), adamw.step()
    for a, b in zip(mats_a + vecs_a, mats_b + vecs_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.equal(mats_a[0], _copies(1, [(24, 8)])[0][0])  # it did move


def test_bf16_orthogonalisation_stays_close_to_fp32():
    """The bf16 Newton-Schulz (fast where bf16 products are) sets nearly the same direction."""
    g = torch.randn(3, 24, 64, generator=torch.Generator().manual_seed(0))
    exact, fast = orthogonalize(g, dtype=torch.float32), orthogonalize(g, dtype=torch.bfloat16)
    cosine = (exact * fast).sum(dim=(-2, -1)) / (exact.norm(dim=(-2, -1)) * fast.norm(dim=(-2, -1)))
    assert cosine.min() > 0.99 and not torch.equal(exact, fast)


def test_state_dict_round_trip_continues_identically():
    (a,), (b,) = _copies(2, [(16, 8)])
    (va,), (vb,) = _copies(2, [(8,)], seed=1)
    opt_a = MuonAdamW([{"params": [a], "muon": True}, {"params": [va]}], lr=0.01)
    opt_b = MuonAdamW([{"params": [b], "muon": True}, {"params": [vb]}], lr=0.01)
    for p in (a, va):
        p.grad = torch.ones_like(p)
    opt_a.step()
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if read back from a checkpoint
    b.data.copy_(a), vb.data.copy_(va)
    for p in (a, va, b, vb):
        p.grad = torch.cos(p.detach())
    opt_a.step(), opt_b.step()
    assert torch.equal(a, b) and torch.equal(va, vb)


def test_muon_groups_take_matrices_only():
    with pytest.raises(ValueError, match="matrices"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(3))], "muon": True}])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_muon_gets_hidden_matrices_never_embeddings_or_head(name):
    net = MODELS[name](vocab_size=11, block_size=8, n_layer=3, n_embd=16)
    chosen = muon_matrices(net)
    ids = {id(p) for p in chosen}
    assert chosen and len(ids) == len(chosen)
    assert all(p.dim() == 2 for p in chosen)
    for m in net.modules():
        if isinstance(m, nn.Embedding):
            assert id(m.weight) not in ids
    head = getattr(net, "lm_head", None)
    if head is not None:
        assert id(head.weight) not in ids
    blocks = [p for n, m in net.named_modules() if isinstance(m, nn.Linear) and "blocks" in n for p in [m.weight]]
    assert blocks and all(id(p) in ids for p in blocks)
