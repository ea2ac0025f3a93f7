"""Timing real steps (gptnano.hardware.time_steps) and the Lightning-free training step it times
(gptnano/train/steps.py), which must be the step LitLM takes."""

import pytest
import torch

from gptnano.hardware import time_steps
from gptnano.models import GPT
from gptnano.train.steps import training_step

SETTINGS = dict(optimizer="muon", learning_rate=4e-3, weight_decay=0.1, beta1=0.9, beta2=0.99, muon_lr=0.02,
                muon_momentum=0.95, muon_weight_decay=0.0)


def test_time_steps_warms_up_then_times_between_its_bounds():
    calls, synced = [], []
    times = time_steps(lambda: calls.append(1), sync=lambda: synced.append(1), warmup=2, min_steps=3, max_steps=5,
                       seconds=100.0)
    assert len(times) == 5 and len(calls) == 7 and all(t >= 0 for t in times)
    assert len(synced) == 6  # after the warm-up, and after every timed step
    assert len(time_steps(lambda: None, warmup=0, min_steps=3, max_steps=50, seconds=0.0)) == 3
    stopped = time_steps(lambda: None, warmup=0, min_steps=2, max_steps=50, seconds=100.0, stop=lambda t: len(t) >= 4)
    assert len(stopped) == 4


def test_the_timed_step_trains():
    torch.manual_seed(0)
    net = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    x = torch.randint(11, (4, 9), generator=torch.Generator().manual_seed(0))
    batch = (x[:, :-1], x[:, 1:])
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(net(batch[0]).flatten(0, 1), batch[1].flatten())
    step = training_step(net, SETTINGS, device="cpu", precision="32-true", batch=batch)
    for _ in range(20):
        step()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(net(batch[0]).flatten(0, 1), batch[1].flatten())
    assert after < before - 0.5  # it overfits the one batch it repeats


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")  # one training step is the point here
def test_the_timed_step_is_litlm_s_step():
    """Same weights, same batch, same settings: the Lightning-free step and a Trainer's first
    step (no warmup, clipping at 1.0) leave the same weights."""
    import lightning as L

    from gptnano.train.module import LitLM

    torch.manual_seed(0)
    x = torch.randint(11, (4, 9), generator=torch.Generator().manual_seed(1))
    batch = (x[:, :-1], x[:, 1:])
    a = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    b = GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    b.load_state_dict(a.state_dict())
    training_step(a, SETTINGS, device="cpu", precision="32-true", batch=batch, ns_dtype=torch.float32)()
    lit = LitLM(b, **SETTINGS, muon_dtype="float32", warmup_steps=0, min_lr=SETTINGS["learning_rate"])
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, accelerator="cpu", precision="32-true")
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
