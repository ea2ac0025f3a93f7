"""A training step without Lightning: the loss, optimizer and arithmetic of LitLM's own step,
for timing real steps before any Trainer exists (the device a run trains on is chosen by
such a measurement, and ``gptnano compare`` sizes wall-time budgets with it).

No Lightning here, so the tools of the dispatcher can use it.
"""

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gptnano import hardware
from gptnano.models.base import LanguageModel
from gptnano.train.optim import build_optimizer

OPTIMIZER_SETTINGS = ("optimizer", "learning_rate", "weight_decay", "beta1", "beta2", "muon_lr", "muon_momentum",
                      "muon_weight_decay")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits[B, T, V]`` against ``targets[B, T]`` in nats per token, computed
    in fp32 whatever the logits' dtype; targets of -100 are not scored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction)


def autocast_for(precision: str, device_type: str):
    """The autocast context of a Lightning precision setting ("bf16-mixed", "16-mixed", "32-true"...)."""
    p = str(precision)
    if p.endswith("-mixed"):
        return torch.autocast(device_type, dtype=torch.bfloat16 if p.startswith("bf16") else torch.float16)
    return contextlib.nullcontext()


def training_step(net: LanguageModel, settings: dict, *, device: torch.device | str, precision: str,
                  batch: tuple[torch.Tensor, torch.Tensor], ns_dtype: torch.dtype = torch.float32,
                  clip: float = 1.0) -> Callable[[], None]:
    """One real optimizer step of ``net`` on ``batch`` as a function of no arguments: forward in
    ``precision``, the loss, backward, gradient clipping, the optimizer ``settings`` describe (a
    dict of LitLM's hyper-parameters: optimizer, learning rates, betas...). ``net`` and the batch
    are moved to ``device``; every call takes one more step on the same batch."""
    device = torch.device(device)
    net = net.to(device).train()
    if str(precision) in ("bf16-true", "16-true"):
        net = net.to(torch.bfloat16 if str(precision).startswith("bf16") else torch.float16)
    idx, targets = (t.to(device) for t in batch)
    fused = device.type in ("cpu", "cuda") and not str(precision).startswith("16")
    optimizer = build_optimizer(net, **{k: settings[k] for k in OPTIMIZER_SETTINGS}, ns_dtype=ns_dtype, fused=fused)
    scaler = torch.amp.GradScaler(device.type) if str(precision) == "16-mixed" else None

    def step() -> None:
        with autocast_for(precision, device.type):
            loss = next_token_loss(net(idx), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def probe_step(net: LanguageModel, hparams: dict, vocab_size: int, batch_size: int, precision: str | None,
               device: str) -> Callable[[], None]:
    """``training_step`` of a copy of ``net`` on ``device``, in ``precision`` (else the one it would
    train in there), with LitLM's ``hparams``, on a random batch of ``batch_size`` x ``block_size``
    token ids below ``vocab_size``: what the device choice (gptnano/devices.py) times."""
    ns_dtype = hardware.fast_dtype(device) if hparams["muon_dtype"] == "auto" else getattr(torch, hparams["muon_dtype"])
    ids = torch.randint(vocab_size, (batch_size, net.block_size + 1), generator=torch.Generator().manual_seed(0))
    return training_step(copy.deepcopy(net), {k: hparams[k] for k in OPTIMIZER_SETTINGS}, device=device,
                         precision=precision or hardware.resolve_precision(device)[0], batch=(ids[:, :-1], ids[:, 1:]),
                         ns_dtype=ns_dtype)
