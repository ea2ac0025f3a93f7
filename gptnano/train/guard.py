"""Stop a diverging run with one line, and never checkpoint its non-finite state.

Each training step folds "is this loss finite?" into a tensor on the device, without
reading it (on a GPU, reading a value makes the host wait for the device). The host
looks at every step in a single CPU process (free there), every ``log_every_n_steps``
steps elsewhere, and before every checkpoint, which is also refused if any weight is not
finite. With several processes the verdict is first agreed by all of them through the
strategy's own reduction, so they stop together instead of some waiting forever in the
next gradient all-reduce.
"""

import lightning as L
import torch

from gptnano.errors import UserError

NEVER = torch.iinfo(torch.long).max


def likely_cause(precision: str, hparams) -> str:
    """What most likely made a run diverge, among what can be seen: pure fp16 weights, a huge
    learning rate; else the usual advice."""
    if str(precision) == "16-true":
        return ("the weights are pure fp16 (--trainer.precision 16-true), where AdamW's eps (1e-8) and small "
                "updates round to zero: use bf16-mixed or 16-mixed")
    lr, muon_lr = hparams.get("learning_rate", 0), hparams.get("muon_lr", 0)
    if lr > 0.1 or hparams.get("optimizer") == "muon" and muon_lr > 1:
        return f"learning rate {lr:g} (muon_lr {muon_lr:g}) is huge: lower it"
    return "lower the learning rate?"


class NonFiniteGuard(L.Callback):
    """Raise ``UserError`` at the first non-finite loss, and before any checkpoint of non-finite
    weights (raising in ``on_save_checkpoint`` means the file is never written)."""

    def __init__(self):
        self._first_bad: torch.Tensor | None = None  # on the device: first step whose loss was not finite, or -1

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = self._first_bad
        self._first_bad = torch.where(~torch.isfinite(loss) & (first < 0), trainer.global_step, first)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        single_cpu = pl_module.device.type == "cpu" and trainer.world_size == 1
        if single_cpu or trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":
            self.check(trainer, pl_module, weights=True)

    def check(self, trainer, pl_module, weights: bool = False) -> None:
        """The one-line error if a loss (or, with ``weights``, a weight) is not finite, on any
        process; every process must call it at the same point."""
        first = self._first_bad if self._first_bad is not None else torch.tensor(-1, device=pl_module.device)
        first = trainer.strategy.reduce(torch.where(first < 0, NEVER, first), reduce_op="min")
        cause = likely_cause(trainer.precision, pl_module.hparams)
        if (step := int(first)) != NEVER:
            raise UserError(f"training stopped: the loss became non-finite at step {step} ({cause}); "
                            "no checkpoint was written after it")
        if weights:
            finite = torch.stack([p.detach().isfinite().all() for p in pl_module.parameters()]).all()
            if not int(trainer.strategy.reduce(finite.long(), reduce_op="min")):
                raise UserError(f"training stopped: the weights became non-finite by step {trainer.global_step} "
                                f"({cause}); no checkpoint was written after it")
