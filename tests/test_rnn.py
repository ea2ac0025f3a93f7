"""The Elman RNN: parity with torch.nn.RNN, the fast path against the plain loop,
causality, and stateful generation against the full forward pass."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from gptnano.models import GPT, RNN
from gptnano.models.rnn import ElmanLayer, ElmanScan, elman_scan
from gptnano.sampling import generate, generate_naive

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ATOL, RTOL = 1e-5, 1e-5  # float32 rounding over a few dozen steps


def elman_stack(n_in: int, n_hidden: int, num_layers: int, fast: bool, bias: bool = True) -> nn.ModuleList:
    return nn.ModuleList(ElmanLayer(n_in if i == 0 else n_hidden, n_hidden, bias, fast) for i in range(num_layers))


def run_stack(stack: nn.ModuleList, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror nn.RNN's interface: (all states of the top layer, last state of every layer)."""
    last = []
    for i, layer in enumerate(stack):
        x, h = layer(x, h0[i])
        last.append(h)
    return x, torch.stack(last)


def copy_from_builtin(stack: nn.ModuleList, ref: nn.RNN) -> None:
    with torch.no_grad():
        for i, layer in enumerate(stack):
            layer.w_x.weight.copy_(getattr(ref, f"weight_ih_l{i}"))
            layer.w_h.weight.copy_(getattr(ref, f"weight_hh_l{i}"))
            if layer.w_x.bias is not None:
                layer.w_x.bias.copy_(getattr(ref, f"bias_ih_l{i}"))
                layer.w_h.bias.copy_(getattr(ref, f"bias_hh_l{i}"))


def param_pairs(stack: nn.ModuleList, ref: nn.RNN):
    for i, layer in enumerate(stack):
        yield layer.w_x.weight, getattr(ref, f"weight_ih_l{i}")
        yield layer.w_h.weight, getattr(ref, f"weight_hh_l{i}")
        if layer.w_x.bias is not None:
            yield layer.w_x.bias, getattr(ref, f"bias_ih_l{i}")
            yield layer.w_h.bias, getattr(ref, f"bias_hh_l{i}")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("B,T,n_in,n_hidden,bias", [(3, 7, 16, 32, True), (1, 1, 8, 8, True), (5, 40, 24, 12, False)])
def test_against_torch_rnn(fast, num_layers, B, T, n_in, n_hidden, bias):
    """Loaded with nn.RNN's weights, our recurrence gives its outputs and all its gradients."""
    torch.manual_seed(0)
    ref = nn.RNN(n_in, n_hidden, num_layers, nonlinearity="tanh", bias=bias, batch_first=True)
    with torch.no_grad():  # larger than the default init so tanh saturates somewhat
        for p in ref.parameters():
            p.uniform_(-0.5, 0.5)
    ours = elman_stack(n_in, n_hidden, num_layers, fast, bias)
    copy_from_builtin(ours, ref)

    x = torch.randn(B, T, n_in, requires_grad=True)
    h0 = torch.randn(num_layers, B, n_hidden, requires_grad=True)
    y, h_n = run_stack(ours, x, h0)
    y_ref, h_n_ref = ref(x, h0)
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(h_n, h_n_ref, rtol=RTOL, atol=ATOL)

    # One random upstream gradient on the outputs and another on the last states.
    gy, gh = torch.randn_like(y), torch.randn_like(h_n)
    pairs = list(param_pairs(ours, ref))
    grads = torch.autograd.grad((y, h_n), [x, h0, *(p for p, _ in pairs)], (gy, gh))
    grads_ref = torch.autograd.grad((y_ref, h_n_ref), [x, h0, *(q for _, q in pairs)], (gy, gh))
    names = ["x", "h0", *(f"param {i}" for i in range(len(pairs)))]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_fast_backward_passes_gradcheck():
    """The hand-written BPTT against finite differences, in float64."""
    torch.manual_seed(0)
    a = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    w_h = (0.5 * torch.randn(5, 5, dtype=torch.float64)).requires_grad_()
    h0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ElmanScan.apply, (a, w_h, h0))
    torch.testing.assert_close(ElmanScan.apply(a, w_h, h0), elman_scan(a, w_h, h0))


def twin_models(**kwargs) -> tuple[RNN, RNN]:
    """The same RNN twice, once with the fast recurrence and once with the plain loop."""
    torch.manual_seed(0)
    fast = RNN(fast=True, **kwargs)
    ref = RNN(fast=False, **kwargs)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("kwargs", [dict(n_hidden=24), dict(n_hidden=16, dropout=0.2, bias=False)])
def test_fast_path_equals_reference_loop(kwargs):
    """Whole model, forward and backward, in training mode (dropout masks drawn alike)."""
    fast, ref = twin_models(vocab_size=11, block_size=16, n_layer=2, n_embd=16, **kwargs)
    idx = torch.randint(11, (3, 20))
    grad_out = torch.randn(3, 20, 11)
    logits = []
    for model in (fast, ref):
        torch.manual_seed(1)  # the recurrence draws no random numbers: both see the same dropout
        logits.append(model(idx))
        logits[-1].backward(grad_out)
    torch.testing.assert_close(logits[0], logits[1], rtol=RTOL, atol=ATOL)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_fast_path_equals_reference_loop_input_grads():
    """The recurrent layer alone: outputs, input grads, weight grads, initial-state grads."""
    torch.manual_seed(0)
    fast, ref = ElmanLayer(10, 20, fast=True), ElmanLayer(10, 20, fast=False)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(4, 33, 10, requires_grad=True)
    h0 = torch.randn(4, 20, requires_grad=True)
    outs = [layer(x, h0)[0] for layer in (fast, ref)]
    torch.testing.assert_close(outs[0], outs[1], rtol=RTOL, atol=ATOL)
    g = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(y, [x, h0, *layer.parameters()], g) for y, layer in zip(outs, (fast, ref))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_causal():
    """Changing token t leaves the logits before t unchanged, and changes them from t on."""
    torch.manual_seed(0)
    model = RNN(vocab_size=11, block_size=16, n_layer=2, n_embd=16).eval()
    idx = torch.randint(11, (2, 24))
    base = model(idx)
    for t in (0, 7, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_reads_beyond_block_size():
    model = RNN(vocab_size=11, block_size=8, n_layer=1, n_embd=16)
    assert model.max_context is None
    assert model(torch.randint(11, (2, 50))).shape == (2, 50, 11)


def test_stateful_generation_matches_full_forward():
    """Prompt first, then one token per call: the same logits as one pass over the text."""
    torch.manual_seed(0)
    model = RNN(vocab_size=11, block_size=8, n_layer=3, n_embd=16, n_hidden=24).eval()
    idx = torch.randint(11, (2, 30))  # longer than block_size on purpose
    full = model(idx)  # (B, T, V)
    logits, cache = model.forward_cached(idx[:, :5])
    assert len(cache) == 3 and cache[0].shape == (2, 24)
    stepped = [logits]
    for t in range(5, 30):
        logits, cache = model.forward_cached(idx[:, t : t + 1], cache)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, dim=1), full[:, 4:], rtol=RTOL, atol=ATOL)


def test_greedy_generate_equals_naive():
    torch.manual_seed(0)
    model = RNN(vocab_size=11, block_size=8, n_layer=2, n_embd=16).eval()
    with torch.no_grad():  # larger weights than the init, so the text depends on more than the last token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    prompt = torch.randint(11, (3, 4))
    out = generate(model, prompt, max_new_tokens=30, temperature=0)
    out_naive = generate_naive(model, prompt, max_new_tokens=30, temperature=0)
    assert out.shape == (3, 34)
    assert torch.equal(out, out_naive)
    assert len(out[0, 4:].unique()) > 2  # not stuck repeating one token


def test_mixed_precision_keeps_the_recurrence_in_float32():
    """Under bf16 autocast the input projection runs in bf16, but the recurrence itself runs
    in float32 (rounding errors would compound over the steps): its states are float32, and
    equal a float64 recurrence over the same bf16 inputs to float32 rounding, a tolerance
    that the same recurrence in bf16 misses by far."""
    torch.manual_seed(0)
    layer = ElmanLayer(16, 32)
    with torch.no_grad():  # a recurrence at the edge of stability, where errors persist
        layer.w_h.weight.copy_(nn.init.orthogonal_(torch.empty(32, 32)))
        layer.w_x.weight.normal_(0.0, 0.5)
    x = torch.randn(4, 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states, _ = layer(x)
        a = F.linear(x, layer.w_x.weight, layer.w_x.bias + layer.w_h.bias)  # the layer's own input part
    assert a.dtype == torch.bfloat16 and states.dtype == torch.float32
    h0 = torch.zeros(4, 32, dtype=torch.float64)
    exact = elman_scan(a.double(), layer.w_h.weight.double(), h0)
    in_bf16 = elman_scan(a, layer.w_h.weight.bfloat16(), h0.bfloat16())
    error = (states.double() - exact).abs().max()
    assert error < 1e-4
    assert (in_bf16.double() - exact).abs().max() > 100 * error  # bf16 arithmetic would fail it


def test_mixed_precision_trains_the_whole_model():
    """The whole RNN under bf16 autocast: bf16 logits, finite gradients everywhere, close to fp32."""
    fast, ref = twin_models(vocab_size=11, block_size=16, n_layer=2, n_embd=16)
    idx = torch.randint(11, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fast(idx)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())
    torch.testing.assert_close(logits.float(), ref(idx), rtol=0, atol=0.05)


def test_no_builtin_recurrent_modules():
    """The recurrence is written here, not borrowed from torch.nn."""
    model = RNN(vocab_size=11, n_layer=2, n_embd=16)
    assert not any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in model.modules())


def net_from_config(path: Path):
    net = yaml.safe_load(path.read_text())["model"]["net"]
    cls = {"gptnano.models.RNN": RNN, "gptnano.models.GPT": GPT}[net["class_path"]]
    return cls(**net["init_args"])


@pytest.mark.parametrize("folder", ["", "gpu"])
def test_configs_match_the_gpt_in_size(folder):
    """configs/rnn.yaml is sized like configs/gpt.yaml, so the two compare fairly."""
    rnn, gpt = (net_from_config(CONFIGS / folder / f"{name}.yaml") for name in ("rnn", "gpt"))
    assert isinstance(rnn, RNN) and rnn.block_size == gpt.block_size
    assert abs(rnn.num_params() / gpt.num_params() - 1) < 0.05, (rnn.num_params(), gpt.num_params())


def test_training_the_rnn_compiled_is_refused_before_the_first_step():
    """torch.compile unrolls the RNN's recurrence (minutes to compile, no faster after): `fit`
    refuses it in one line when the fit starts, while a checkpoint trained compiled still loads."""
    from gptnano.errors import UserError
    from gptnano.train.module import LitLM

    def net(cls):
        return cls(vocab_size=11, block_size=8, n_layer=1, n_embd=16)

    compiled_rnn = LitLM(net(RNN), compile=True)  # built (as predict and generate build it) ...
    with pytest.raises(UserError, match=r"--model.compile true does not pay for the RNN: .*--model.compile false$"):
        compiled_rnn.on_fit_start()  # ... but not trained
    LitLM(net(RNN)).on_fit_start()
    LitLM(GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), compile=True).on_fit_start()


def test_fit_refuses_the_rnn_compiled_before_building_anything(tmp_path):
    """The command line's refusal comes before any class is built (so `gptnano compare`, which resolves
    every config first, refuses it up front too): one line, exit status 2, no run folder."""
    from tests.helpers import TINY_GPT, make_text, run_cli

    (tmp_path / "t.txt").write_text(make_text(), encoding="utf-8")
    rnn = [a if a != "GPT" else "RNN" for a in TINY_GPT if a not in ("--model.net.n_head", "2")]
    proc = run_cli(["fit", *rnn, "--data.path", "t.txt", "--model.compile", "true"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gptnano: error: --model.compile true does not pay for the RNN: ")
    assert not (tmp_path / "checkpoints").exists()
