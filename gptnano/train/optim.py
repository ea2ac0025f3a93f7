"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural
networks") keeps SGD momentum for a weight matrix, but instead of stepping
along the momentum it steps along its *orthogonalised* version: the matrix
with the same singular vectors and every singular value set to ~1. Small
directions of the gradient get as much update as large ones, which on tiny
Shakespeare roughly halves the steps a GPT needs to reach a given validation
loss (docs/results.md, "Time to a validation loss"). Five Newton-Schulz
iterations approximate the orthogonalisation with matrix products only, batched
over the matrices of one shape, on the small Gram matrix where that saves work.

Muon is made for the matrices *inside* the network. Embeddings, the output
head (tied to the embedding here), biases, LayerNorm gains and convolution
kernels stay with AdamW. One optimizer object holds both kinds of parameter
group, so Lightning's automatic optimization, the learning-rate schedule
(which scales every group's rate by the same factor) and checkpoints see a
single optimizer.
"""

import math
from collections import defaultdict

import torch
from torch import nn
from torch.optim.adamw import adamw  # torch's functional AdamW: its fused CPU/CUDA kernel

# Quintic Newton-Schulz coefficients from Muon's reference implementation:
# chosen to push every singular value in (0, 1] towards ~1 in five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The Gram form (gram_newton_schulz) restarts from the rectangular matrix after this many steps.
GRAM_RESTART = 3


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16,
                  gram: bool | None = None) -> torch.Tensor:
    """Approximately ``U V^T`` for ``g = U S V^T`` (one matrix ``[r, c]`` or a stack ``[n, r, c]``).

    Each step maps ``X -> a X + (b A + c A^2) X`` with ``A = X X^T``; on the singular
    values that is the polynomial ``f(s) = a s + b s^3 + c s^5``. Dividing each matrix by
    its Frobenius norm first puts its singular values in (0, 1]; five steps then send every
    value s >= 0.002 into [0.68, 1.21] (s >= 0.01: into [0.68, 1.14]) and multiply smaller
    ones by at most a^5 = 485, so the result is ``U f^5(S) V^T``, within that distance of
    ``U V^T``. ``dtype`` is the arithmetic's: bf16 is enough (the result only sets a
    direction) and fastest where bf16 products are fast; fp32 where they are not (a CPU
    without native bf16 emulates them, many times slower).

    A stack is orthogonalised in one batched product per step, each matrix on its short
    side (``A`` is then the smaller Gram matrix). ``gram`` picks the arithmetic: the
    Gram form (``gram_newton_schulz``) for matrices at least 1.5 times as long as they are
    wide, where it needs fewer FLOPs, the plain iteration for the rest (None: by shape).
    """
    x = g.to(dtype).reshape(-1, *g.shape[-2:])  # a stack of matrices
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # work on the short side: A is then the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if gram is None:
        gram = 2 * x.size(-1) >= 3 * x.size(-2)
    x = gram_newton_schulz(x, steps) if gram else newton_schulz(x, steps)
    return (x if wide else x.mT).reshape(g.shape).to(g.dtype)


def newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` quintic Newton-Schulz iterations on a stack ``x[n, m, k]`` (m <= k, each
    matrix of Frobenius norm <= 1): ``m^2 (2k + m)`` multiply-adds per matrix and step."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        A = x @ x.mT  # [n, m, m]
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, B, x, beta=a)  # a X + B X
    return x


def gram_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iterations as ``newton_schulz``, carried on the small Gram matrix.

    Every iterate is a polynomial in ``R = X X^T`` times the starting ``X``: ``X_t = Q_t X``.
    So the loop updates only m x m matrices, ``P = a I + b R + c R^2``, ``Q <- Q P`` and
    ``R <- P R P``, and touches the long side [m, k] only to start, to restart and to end:
    ``4m^2 k + 14m^3`` multiply-adds per matrix for five steps against ``10m^2 k + 5m^3``, 2/3
    for k = 4m, more than the plain iteration below k = 1.5m (Zhang, Amsel, Chen and Dao
    2026, "Gram Newton-Schulz"). In exact arithmetic the result is the same. In floating
    point, rounding in ``R`` can turn a tiny eigenvalue negative, which ``R <- P R P`` then
    amplifies (~12x a step), so the loop restarts from ``X_t = Q_t X`` and its fresh Gram
    matrix after ``GRAM_RESTART`` steps. That work restarts after two; measured here on
    steep spectra in bf16, a restart after three keeps the result as close to the exact one
    as the plain iteration's (singular values <= 1.21), one after two did not (up to 1.3)."""
    a, b, c = NS_COEFFICIENTS
    R = x @ x.mT  # [n, m, m]
    Q = None
    for step in range(steps):
        if step == GRAM_RESTART:
            x = Q @ x  # X_t: back to the long side, once
            R, Q = x @ x.mT, None
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)  # b R + c R^2; the step's polynomial is P = a I + Z
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)  # Q = P
        else:
            Q = torch.baddbmm(Q, Q, Z, beta=a)  # Q P = a Q + Q Z
        if step + 1 < steps and step + 1 != GRAM_RESTART:  # the next step needs R = X X^T at its X
            RP = torch.baddbmm(R, R, Z, beta=a)  # R P
            R = torch.baddbmm(RP, Z, RP, beta=a)  # P R P
    return Q @ x


def muon_matrices(net: nn.Module) -> list[nn.Parameter]:
    """The weights Muon should train: every ``nn.Linear`` weight inside the network,
    except the output head and any weight shared with an ``nn.Embedding`` (a tied head)."""
    embedded = {id(p) for m in net.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return [
        m.weight
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head") and id(m.weight) not in embedded
    ]


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two update rules: groups with ``muon=True`` take Muon steps,
    the others AdamW steps.

    A Muon group's parameters must be matrices. Its learning rate is scaled per
    matrix by ``sqrt(max(1, rows / cols))`` (as in Muon's reference), so tall
    matrices take the same per-element step as square ones. Weight decay is
    decoupled in both rules: ``p -= lr * weight_decay * p``.

    Args:
        params: parameter groups (dicts); ``muon=True`` marks a Muon group (default False);
            any group may set its own ``lr`` and ``weight_decay``.
        lr, betas, eps, weight_decay: AdamW's settings (the defaults of every group).
        momentum: Muon's momentum; the step is taken along the Nesterov look-ahead.
        ns_steps: Newton-Schulz iterations per Muon step.
        ns_dtype: dtype of the Newton-Schulz products (bf16 where bf16 products are fast).
        fused: use torch's fused AdamW kernel for the AdamW groups (CPU and CUDA).
        gram: the Newton-Schulz arithmetic (``orthogonalize``): None picks the Gram form for
            long matrices and the plain iteration for the rest; False the plain iteration
            everywhere (the reference's arithmetic, op for op).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.99), eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.95, ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16, fused: bool = False,
                 gram: bool | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, fused=fused, muon=False)
        self.ns_dtype, self.gram = ns_dtype, gram
        self._stacks = {}  # _stack's buffers
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        # Matrices of one shape are orthogonalised together, tall ones transposed to
        # join the wide ones of the same size (orthogonalising X^T gives the transpose
        # of orthogonalising X): one batched product per Newton-Schulz step and shape.
        by_shape = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_shape[(min(p.shape), max(p.shape), p.dtype, p.device)].append(p)
        for key, params in by_shape.items():
            stack = self._stack(key, len(params))  # [n, short, long]
            for p, u in zip(params, stack):
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - mu)  # buf = mu * buf + (1 - mu) * grad
                torch.lerp(p.grad, buf, mu, out=u if p.size(0) <= p.size(1) else u.mT)  # Nesterov look-ahead
            updates = orthogonalize(stack, group["ns_steps"], dtype=self.ns_dtype, gram=self.gram)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            for p, u in zip(params, updates):
                rows, cols = p.shape
                p.add_(u if rows <= cols else u.mT, alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def _stack(self, key: tuple, n: int) -> torch.Tensor:
        """The buffer the Nesterov updates of ``n`` matrices of one shape are written into, the
        same one every step (not state: nothing in it outlives the step)."""
        short, long, dtype, device = key
        if (key, n) not in self._stacks:
            self._stacks[key, n] = torch.empty(n, short, long, dtype=dtype, device=device)
        return self._stacks[key, n]

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=group["fused"] or None,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def param_groups(net: nn.Module, *, muon: bool, weight_decay: float, muon_lr: float,
                 muon_weight_decay: float) -> list[dict]:
    """The optimizer's parameter groups, named (TensorBoard's learning-rate cards read
    ``lr/<optimizer>/<name>``). AdamW's weight decay goes on every matrix it trains (Linear
    weights and embeddings: the token embedding is also the output head, a matrix like any
    other), none on biases and LayerNorm gains, which only shift and scale. With ``muon``,
    the matrices inside the network (``muon_matrices``) form Muon's own group."""
    params = [p for p in net.parameters() if p.requires_grad]
    matrices = [p for p in muon_matrices(net) if p.requires_grad] if muon else []
    in_muon = {id(p) for p in matrices}
    rest = [p for p in params if id(p) not in in_muon]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "name": "adamw"},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "name": "adamw_no_decay"},
    ]
    if matrices:
        groups.append({"params": matrices, "muon": True, "lr": muon_lr, "weight_decay": muon_weight_decay,
                       "name": "muon"})
    return groups


def group_settings(*, learning_rate: float, weight_decay: float, beta1: float, beta2: float, muon_lr: float,
                   muon_momentum: float, muon_weight_decay: float) -> dict[str, dict]:
    """Each named parameter group's settings as ``build_optimizer`` gives them (``lr`` is the
    peak the schedule scales): what a resumed run re-applies over the ones Lightning restored
    from the checkpoint, so that settings typed on a resume are the ones that train."""
    adamw = {"lr": learning_rate, "betas": (beta1, beta2)}
    return {"adamw": {**adamw, "weight_decay": weight_decay}, "adamw_no_decay": {**adamw, "weight_decay": 0.0},
            "muon": {"lr": muon_lr, "weight_decay": muon_weight_decay, "momentum": muon_momentum}}


def build_optimizer(net: nn.Module, *, optimizer: str, learning_rate: float, weight_decay: float, beta1: float,
                    beta2: float, muon_lr: float, muon_momentum: float, muon_weight_decay: float,
                    ns_dtype: torch.dtype, fused: bool) -> torch.optim.Optimizer:
    """The optimizer LitLM trains with (``optimizer`` "muon": MuonAdamW; "adamw": torch's AdamW),
    built from its hyper-parameters, so a step timed outside Lightning is the same step.

    ``fused`` takes torch's fused AdamW kernel, which updates every tensor in one pass (CPU and
    CUDA) instead of one small operation per tensor; not with fp16's loss scaling, where a
    fused step would see still-scaled gradients when clipping."""
    groups = param_groups(net, muon=optimizer == "muon", weight_decay=weight_decay, muon_lr=muon_lr,
                          muon_weight_decay=muon_weight_decay)
    if any(g.get("muon") for g in groups):
        return MuonAdamW(groups, lr=learning_rate, betas=(beta1, beta2), momentum=muon_momentum,
                         ns_dtype=ns_dtype, fused=fused)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=fused or None)
