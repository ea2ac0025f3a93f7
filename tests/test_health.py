"""TrainingHealth (gptnano/train/health.py): what it logs for each architecture, that it warns
once when a run is unhealthy (a tanh RNN started with weights x5) and not when it is healthy,
and that it changes nothing in training: losses and weights bit-identical with it or without."""

import copy
import math

import pytest
import torch
from lightning.pytorch.loggers import Logger

from gptnano import lines
from gptnano.models import CNN, GPT, RNN, Backpack
from gptnano.train.health import TrainingHealth, entropy, group_of, leading, probes
from gptnano.train.module import LitLM

VOCAB, T, B = 11, 16, 4


def tiny(arch: str, dropout: float = 0.0):
    sizes = dict(vocab_size=VOCAB, block_size=T, n_layer=2, n_embd=16, dropout=dropout)
    if arch in ("gpt", "backpack"):
        sizes["n_head"] = 2
    if arch == "cnn":
        sizes["kernel_size"] = 6  # a receptive field of 1 + 5 * (1 + 2) = block_size with two blocks
    return {"gpt": GPT, "rnn": RNN, "backpack": Backpack, "cnn": CNN}[arch](**sizes)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randint(VOCAB, (n, B, T + 1), generator=torch.Generator().manual_seed(1))
    return [(w[:, :-1], w[:, 1:]) for w in x]


class Collect(Logger):
    """A logger that keeps what it is given: {step: {tag: value}}."""

    name, version = "collect", 0

    def __init__(self):
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class _Trainer:
    """What the callback reads of a Trainer, for driving it by hand."""

    accumulate_grad_batches, is_global_zero = 1, True

    def __init__(self, step: int = 0, loggers=()):
        self.global_step, self.loggers = step, list(loggers)


def measured_step(arch: str) -> dict[str, float]:
    """One training step of a tiny ``arch`` driven by hand through the callback's hooks, at a
    measured step; returns what it logged."""
    torch.manual_seed(0)
    lit = LitLM(tiny(arch))
    health, logger = TrainingHealth(), Collect()
    trainer = _Trainer(step=0, loggers=[logger])
    optimizer = torch.optim.AdamW(lit.parameters(), lr=1e-3)
    batch = batches(1)[0]
    health.on_train_batch_start(trainer, lit, batch, 0)
    lit.loss(*batch).backward()
    health.on_before_optimizer_step(trainer, lit, optimizer)
    optimizer.step()
    trainer.global_step += 1
    health.on_train_batch_end(trainer, lit, None, batch, 0)
    assert not any(m._forward_hooks for m in lit.modules()), "hooks left behind after the measured step"
    return logger.metrics[0]


BLOCK = {"act_mean", "act_std", "gelu_zero", "grad_ratio_log10", "update_ratio_log10"}
RATIOS = {"grad_ratio_log10", "update_ratio_log10"}
EXPECTED = {  # group -> quantities, per architecture (tiny(): 2 blocks)
    "gpt": {"block0": BLOCK | {"attn_entropy"}, "block1": BLOCK | {"attn_entropy"}, "embed": RATIOS},
    "rnn": {"block0": BLOCK | {"tanh_sat"}, "block1": BLOCK | {"tanh_sat"}, "embed": RATIOS},
    "backpack": {"block0": BLOCK | {"attn_entropy"}, "block1": BLOCK | {"attn_entropy"}, "embed": RATIOS,
                 "senses": RATIOS | {"gelu_zero", "alpha_entropy"}},
    "cnn": {"block0": BLOCK, "block1": BLOCK, "embed": RATIOS},
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_each_block_logs_its_health(arch):
    logged = measured_step(arch)
    want = {f"health/{group}/{q}" for group, quantities in EXPECTED[arch].items() for q in quantities}
    assert set(logged) == want
    assert all(math.isfinite(v) for v in logged.values())
    if arch in ("gpt", "backpack"):  # nearly uniform attention at init: close to the mean of ln(i + 1)
        uniform = sum(math.log(i + 1) for i in range(T)) / T
        assert logged["health/block0/attn_entropy"] == pytest.approx(uniform, rel=0.05)


def test_nothing_is_hooked_outside_the_measured_steps():
    lit, health = LitLM(tiny("gpt")), TrainingHealth(every_n_steps=50)
    for step in (1, 49, 51):
        health.on_train_batch_start(_Trainer(step), lit, None, 0)
        assert not any(m._forward_hooks for m in lit.modules())
    health.on_train_batch_start(_Trainer(100), lit, None, 0)
    assert any(m._forward_hooks for m in lit.modules())


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_probes_leave_bf16_gradients_alone(arch):
    """Under mixed precision autocast keeps each weight's bf16 copy for the rest of the forward:
    a probe that recomputes through a weight before the network's own use of it (the Backpack's
    alpha, from ln_f's output) must not leave a copy without autograd history there."""
    torch.manual_seed(0)
    net, idx = tiny(arch), batches(1)[0][0]
    grads = []
    for probed in (False, True):
        net.zero_grad()
        handles = [m.register_forward_hook(h) for m, h in probes(net, lambda tag, v: None)] if probed else []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(idx).float().logsumexp(-1).mean().backward()
        for handle in handles:
            handle.remove()
        grads.append([p.grad for p in net.parameters()])
    assert all(a is not None and torch.equal(a, b) for a, b in zip(*grads))


def test_no_hooks_under_torch_compile(capsys):
    """Hooks coming and going would recompile the model at every measured step: the compiled
    run gets the gradient and update ratios only, and says so once."""
    lit, health = LitLM(tiny("gpt"), compile=True), TrainingHealth(every_n_steps=1)
    for step in (0, 1):
        health.on_train_batch_start(_Trainer(step), lit, None, 0)
        assert not any(m._forward_hooks for m in lit.modules())
        health.on_exception(None, lit, None)
    assert capsys.readouterr().err.count("not probed under --model.compile") == 1


def test_entropy_in_nats():
    one_hot = torch.eye(4)[None]  # each query attends to one position
    uniform = torch.full((1, 4, 4), 0.25)
    assert entropy(one_hot).item() == 0.0
    assert entropy(uniform).item() == pytest.approx(math.log(4))


def test_long_contexts_recompute_attention_for_a_few_sequences_only():
    assert leading(torch.zeros(24, 64, 8), heads=4).size(0) == 24  # configs/gpt.yaml: the whole batch
    assert leading(torch.zeros(64, 1024, 8), heads=12).size(0) == 1  # GPT-2's context: one (12, 1024, 1024)


def test_groups_by_block():
    assert group_of("blocks.3.mixer.c_attn.weight") == "block3"
    assert group_of("_orig_mod.blocks.12.mlp.c_fc.weight") == "block12"
    assert group_of("wte.weight") == group_of("wpe.weight") == "embed"
    assert group_of("sense_net.mlp.c_fc.weight") == group_of("sense_qk.weight") == "senses"


def test_warns_once_per_kind_naming_the_worst_block(capsys):
    health = TrainingHealth()
    sick = {"block0/tanh_sat": 0.30, "block1/tanh_sat": 0.55, "block2/tanh_sat": 0.02,
            "block0/update_ratio_log10": -0.5}
    health.warn(sick, step=0)
    health.warn(sick, step=50)  # the same problems again: nothing more
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("gptnano: training health, step 0: ") for line in err)
    tanh = next(line for line in err if "tanh_sat" in line)
    assert "block1 tanh_sat 0.55 (healthy at the start <= 0.1; also block0) | " in tanh and "gradient" in tanh
    assert "block0 update_ratio_log10 -0.5 (healthy <= -1) | " in next(line for line in err if "update" in line)
    assert all(len(line) < lines.MAX_WIDTH for line in err)  # whole, not cut


def test_saturation_learned_in_training_is_held_to_a_wider_range(capsys):
    """An Elman network learns to saturate: after step 0 only three quarters of its states
    pinned at +-1 are too many."""
    health = TrainingHealth()
    health.warn({"block0/tanh_sat": 0.55}, step=500)
    assert capsys.readouterr().err == ""
    health.warn({"block0/tanh_sat": 0.80}, step=550)
    assert "block0 tanh_sat 0.8 (healthy <= 0.75) | " in capsys.readouterr().err


# ----- in a real Trainer ----------------------------------------------------------------
def train(net, steps: int, callbacks=(), logger=False, **settings) -> tuple[list[torch.Tensor], dict]:
    """``steps`` steps of LitLM (its defaults, or ``settings``) on the CPU in fp32, eager, seeded;
    returns (losses, weights)."""
    import lightning as L

    class Losses(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(outputs["loss"].detach().clone())

    losses = Losses()
    torch.manual_seed(0)
    lit = LitLM(net, **settings)
    trainer = L.Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", precision="32-true", gradient_clip_val=1.0,
                        callbacks=[*callbacks, losses])
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches(steps), batch_size=None))
    return losses.seen, lit.net.state_dict()


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`", "ignore:The number of training batches")
@pytest.mark.parametrize("arch", list(EXPECTED))
def test_training_is_bit_identical_with_or_without_it(arch):
    """Dropout on, so every random draw shows: measuring at every step (hooks, the attention
    recomputed, weights copied) changes no loss and no weight, to the last bit."""
    net = tiny(arch, dropout=0.2)
    logger = Collect()
    fast = dict(learning_rate=1e-2, warmup_steps=0)  # large steps: any difference grows
    on = train(copy.deepcopy(net), 4, [TrainingHealth(every_n_steps=1)], logger, **fast)
    off = train(net, 4, **fast)
    assert len(on[0]) == len(off[0]) == 4
    assert all(torch.equal(a, b) for a, b in zip(*[run[0] for run in (on, off)]))
    assert all(torch.equal(on[1][k], off[1][k]) for k in off[1])
    assert sorted(logger.metrics) == [0, 1, 2, 3]  # it did measure, at every step


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`", "ignore:The number of training batches")
def test_a_tanh_rnn_started_with_weights_x5_is_warned_about(capsys):
    net = RNN(vocab_size=VOCAB, block_size=T, n_layer=2, n_embd=32)
    healthy = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(5)
    train(net, 3, [TrainingHealth()])  # no logger: the line is all there is
    warned = [line for line in capsys.readouterr().err.splitlines() if "training health" in line]
    assert len(warned) >= 1 and any("tanh_sat" in line for line in warned), warned
    tanh = next(line for line in warned if "tanh_sat" in line)
    assert tanh.startswith("gptnano: training health, step 0: block") and "(healthy at the start <= 0.1" in tanh

    train(healthy, 3, [TrainingHealth()])
    assert "training health" not in capsys.readouterr().err
