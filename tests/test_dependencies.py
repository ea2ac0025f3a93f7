"""The private names of Lightning, jsonargparse and torch that gptnano relies on, checked in one
place, so that a release that renames one fails here with its name instead of somewhere deep in a run."""

import pytest
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_summary import model_summary

USED = [
    (ModelCheckpoint, "_save_last_checkpoint", "gptnano.train.checkpointing.Checkpoint refreshes last.ckpt between validations"),
    (ModelCheckpoint, "_should_skip_saving_checkpoint", "gptnano.train.checkpointing.Checkpoint"),
    (ModelCheckpoint, "_monitor_candidates", "gptnano.train.checkpointing.Checkpoint"),
    (model_summary, "_format_summary_table", "gptnano.cli.quiet prints the model summary without FLOPs"),
]


def test_a_module_outside_a_trainer_has_none():
    """LitLM._is_logging_step reads LightningModule._trainer (self.trainer raises when there is none)."""
    from gptnano.models import GPT
    from gptnano.train.module import LitLM

    lit = LitLM(GPT(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4))
    assert "_trainer" in vars(lit) and lit._trainer is None and isinstance(lit, LightningModule)


@pytest.mark.parametrize("owner,name,why", USED, ids=[n for _, n, _ in USED])
def test_lightning_still_has_it(owner, name, why):
    assert callable(getattr(owner, name, None)), f"Lightning no longer has {name}: {why}"


def test_torch_still_has_its_scan_operator():
    """The RNN exports its recurrence to ONNX as one loop through torch's scan, private in torch 2.13
    (gptnano.models.rnn.elman_scan_exportable): it must still compute elman_scan's states."""
    import torch

    from gptnano.models.rnn import elman_scan, elman_scan_exportable

    g = torch.Generator().manual_seed(0)
    a, w_h, h0 = torch.randn(3, 7, 5, generator=g), torch.randn(5, 5, generator=g), torch.randn(3, 5, generator=g)
    torch.testing.assert_close(elman_scan_exportable(a, w_h, h0), elman_scan(a, w_h, h0))


def test_dependencies_are_bounded_where_an_announced_removal_would_break_us():
    """Issue 19, item 10: jsonargparse 5.0 removes APIs Lightning 2.6's CLI calls (deprecated in 4.49),
    so an unbounded install would break with the first 5.0 release; the installed versions fit."""
    from importlib.metadata import version
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    required = {r.name: r for r in map(Requirement, pyproject["project"]["dependencies"])}
    assert not required["jsonargparse"].specifier.contains("5.0.0") and not required["lightning"].specifier.contains("3.0.0")
    for name in ("jsonargparse", "lightning"):
        assert required[name].specifier.contains(version(name)), (name, version(name))
    filters = pyproject["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert "error::DeprecationWarning:gptnano" in filters  # our own deprecations fail the suite


def test_lambdalr_still_keeps_what_a_resume_sets():
    """LitLM.apply_optimizer_settings sets LambdaLR's base_lrs, lr_lambdas and its private _last_lr (what
    get_last_lr returns) after Lightning restored the saved schedule."""
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    assert {"base_lrs", "lr_lambdas", "_last_lr", "last_epoch"} <= set(vars(schedule))
    schedule._last_lr = [0.5]
    assert schedule.get_last_lr() == [0.5]


def test_lightning_s_stop_flag_is_still_where_request_stop_sets_it():
    """gptnano.train.checkpointing.request_stop sets Lightning's private SIGTERM flag (Ctrl-C: stop after
    the step and save); the public ``trainer.received_sigterm`` must then read it."""
    from lightning.pytorch import Trainer

    from gptnano.train.checkpointing import request_stop

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert not trainer.received_sigterm
    request_stop(trainer)
    assert trainer.received_sigterm
