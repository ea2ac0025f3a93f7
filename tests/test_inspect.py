"""`gptnano inspect` and gptnano.views: the numbers each view shows are the model's own, checked
against the model (not the pixels): attention rows are distributions over the past, the RNN's
states are its layers' outputs, a Backpack's (position, sense) parts add up to its logits, a CNN's
attribution stops at its receptive field, and the surprisal's mean is the evaluation loss. Then
the page: one JSON block with the documented keys, nothing loaded from the network, one-line errors."""

import json
import re
from pathlib import Path

import pytest
import torch

from gptnano import views
from gptnano.data.tokenizer import CharTokenizer, make_tokenizer
from gptnano.data.windows import EvalWindows
from gptnano.errors import UserError
from gptnano.models import MODELS
from gptnano.models.gpt import GPT
from gptnano.models.rnn import RNN
from gptnano.train.steps import next_token_loss
from tests.helpers import make_text, scrambled

TEXT = make_text(3000) + views.PASSAGE + '"“”'  # the default passage's characters, and quotes for the RNN
TOKENIZER = CharTokenizer.from_text(TEXT)
V = len(TOKENIZER)
SIZES = {  # tiny networks, context 16
    "gpt": dict(block_size=16, n_layer=2, n_head=2, n_embd=16),
    "rnn": dict(block_size=16, n_layer=2, n_embd=16, n_hidden=12),
    "backpack": dict(block_size=16, n_layer=2, n_head=2, n_embd=16, n_senses=4),
    "cnn": dict(block_size=8, n_layer=3, n_embd=16),  # dilations 1, 2, 4: receptive field 8
}
PASSAGE = 'ROMEO:\nSay "no"!'  # 16 characters


def tiny(arch: str, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    return scrambled(MODELS[arch](vocab_size=V, **{**SIZES[arch], **sizes}))


def ids_of(text: str) -> torch.Tensor:
    return TOKENIZER.encode(text)


# ----- every model: surprisal, the top next characters, the loss ------------------------------
@pytest.mark.parametrize("arch", list(SIZES))
def test_the_mean_surprisal_is_the_loss_evaluation_gives_the_same_tokens(arch):
    net = tiny(arch)
    text = PASSAGE[: net.block_size]
    data = views.look_inside(net, TOKENIZER, text)
    ids = ids_of(text)
    (x, y), = EvalWindows(ids, block_size=len(ids) - 1, batch_size=4)  # one window: every target once
    with torch.no_grad():
        loss = next_token_loss(net(x), y).item()
    assert data["surprisal"][0] is None and len(data["surprisal"]) == len(ids)
    assert abs(data["mean_loss"] - loss) < 1e-6  # fp32 both
    assert abs(sum(data["surprisal"][1:]) / (len(ids) - 1) - loss) < 1e-6
    with torch.no_grad():
        probs = net(ids[None])[0].softmax(-1)
    for t in range(len(ids)):
        assert data["top_ids"][t] == probs[t].topk(5).indices.tolist()
        assert torch.allclose(torch.tensor(data["top_probs"][t]), probs[t].topk(5).values, atol=1e-6)
    assert data["ids"] == ids.tolist() and data["vocab"] == list(TOKENIZER.vocab) and data["text"] == text


def test_numbers_are_written_exactly_as_fp32():
    t = torch.tensor([[0.1, 1 / 3, -2.5e-5], [0.0, 7.0, 1e-30]])
    back = torch.tensor(views.plain(t), dtype=torch.float32)
    assert torch.equal(back, t) and views.plain(t)[0][0] == 0.1 and isinstance(views.plain(t[0, 1]), float)


def test_inspection_leaves_the_model_as_it_was():
    net = tiny("gpt").train()
    views.look_inside(net, TOKENIZER, PASSAGE)
    assert net.training
    half = tiny("gpt").to(torch.bfloat16)
    data = views.look_inside(half, TOKENIZER, PASSAGE)  # a copy is read in fp32; the network stays bf16
    assert next(half.parameters()).dtype == torch.bfloat16 and data["mean_loss"] > 0


# ----- the GPT (and the Backpack's transformer): attention ------------------------------------
@pytest.mark.parametrize("arch", ["gpt", "backpack"])
def test_attention_rows_sum_to_1_and_are_0_above_the_diagonal(arch):
    net = tiny(arch)
    ids = ids_of(PASSAGE)
    maps = views.attention_maps(net, ids)
    assert len(maps) == 2 and all(m.shape == (2, 16, 16) for m in maps)
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones(2, 16), atol=1e-6)
        assert torch.equal(m.triu(diagonal=1), torch.zeros_like(m))
    shown = views.look_inside(net, TOKENIZER, PASSAGE)["attention"]
    assert (shown["n_layer"], shown["n_head"]) == (2, 2)
    assert torch.equal(torch.tensor(shown["maps"], dtype=torch.float32), torch.stack(maps))  # exactly those numbers


def test_the_attention_maps_are_the_ones_each_layer_mixes_its_values_with():
    """Each map, times the layer's values, gives back what the layer output in the forward pass."""
    net = tiny("gpt")
    ids = ids_of(PASSAGE)
    seen = []
    hooks = [b.mixer.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], out))) for b in net.blocks]
    with torch.no_grad():
        net(ids[None])
        maps = views.attention_maps(net, ids)
    for h in hooks:
        h.remove()
    for block, att, (x, out) in zip(net.blocks, maps, seen):
        _, _, v = block.mixer.heads(x)  # (1, nh, T, hs)
        y = (att[None] @ v).transpose(1, 2).reshape(1, len(ids), -1)
        assert torch.allclose(block.mixer.c_proj(y), out, atol=1e-5)


# ----- the RNN: hidden states and the unit finder ---------------------------------------------
def test_the_rnn_states_are_the_layers_own_hidden_states():
    net = tiny("rnn")
    ids = ids_of(PASSAGE)
    states = views.hidden_states(net, ids)
    shown = views.look_inside(net, TOKENIZER, PASSAGE)["rnn"]
    with torch.no_grad():
        x = net.wte(ids[None])
        for block, h in zip(net.blocks, states):
            own, last = block.mixer.rnn(block.ln_1(x))  # the Elman layer run on its own input
            assert torch.equal(h, own[0]) and torch.equal(h[-1], last[0])
            x = block(x)
    assert [s.shape for s in states] == [(16, 12)] * 2 and shown["n_hidden"] == 12
    assert torch.equal(torch.tensor(shown["states"], dtype=torch.float32), torch.stack(states))
    saturated = [(s.abs() > views.SATURATED).float().mean().item() for s in states]
    assert shown["saturation"] == pytest.approx(saturated)


def test_features_of_a_passage():
    f = views.features(list('ab "c d"\ne'))
    assert f["inside_quotes"] == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]  # from the opening quote, not the closing one
    assert f["line_position"] == [1, 2, 3, 4, 5, 6, 7, 8, 0, 1]
    assert f["after_newline"] == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert f["in_word"] == [1, 1, 0, 0, 1, 0, 1, 0, 0, 1]
    assert views.features(list("“a” b"))["inside_quotes"] == [1, 1, 0, 0, 0]


def test_the_finder_ranks_a_unit_that_tracks_a_feature_first():
    torch.manual_seed(0)
    tokens = list('He said "go now" and "stay" then\nleft')
    feats = views.features(tokens)
    states = [torch.rand(len(tokens), 6) * 2 - 1 for _ in range(2)]
    states[1][:, 4] = torch.tensor(feats["inside_quotes"]) * -1.6 + 0.8 + 0.01 * torch.randn(len(tokens))
    found = views.unit_finder(states, feats, k=3)
    best = found["inside_quotes"][0]
    assert (best["layer"], best["unit"]) == (1, 4) and best["r"] < -0.99
    assert len(found["line_position"]) == 3
    assert [abs(u["r"]) for u in found["in_word"]] == sorted((abs(u["r"]) for u in found["in_word"]), reverse=True)
    flat = views.unit_finder(states, {"inside_quotes": [0.0] * len(tokens)})  # nothing to track
    assert flat == {"inside_quotes": []}


# ----- the Backpack: senses -------------------------------------------------------------------
def test_the_backpack_parts_add_up_to_its_logits():
    net = tiny("backpack")
    ids = ids_of(PASSAGE)
    with torch.no_grad():
        logits = net(ids[None])[0]  # (T, V)
        parts = views.sense_contributions(net, ids)  # (T, T, n_senses, V)
        assert parts.shape == (16, 16, 4, V)
        assert torch.allclose(parts.sum(dim=(1, 2)), logits, atol=1e-5)
        future = torch.ones(16, 16, dtype=torch.bool).triu(diagonal=1)  # j > i
        assert parts[future].abs().max() == 0
        targets = logits.argmax(-1)
        picked = views.sense_contributions(net, ids, targets)  # (T, T, n_senses)
        assert torch.allclose(picked, parts[torch.arange(16), :, :, targets], atol=1e-6)
        with net.scaled_sense(2, 0.0):  # an edited sense counts as forward counts it
            assert torch.allclose(views.sense_contributions(net, ids).sum(dim=(1, 2)), net(ids[None])[0], atol=1e-5)
    shown = views.look_inside(net, TOKENIZER, PASSAGE)["backpack"]
    assert shown["predicted"]["target"] == targets.tolist()
    assert shown["predicted"]["logit"] == pytest.approx(logits[torch.arange(16), targets].tolist(), abs=1e-5)
    assert shown["actual"]["target"] == ids[1:].tolist() + [None]
    alpha = net.sense_weights(ids[None])[0]
    table = views.sense_table(net)
    for i, row in enumerate(shown["predicted"]["top"]):
        assert len(row) == min(views.TOP_CONTRIBUTIONS, (i + 1) * 4)  # only the pairs of positions j <= i
        everything = picked[i, : i + 1].flatten()
        assert row[0]["logit"] == pytest.approx(everything.max().item(), abs=1e-6)
        assert [p["logit"] for p in row] == sorted((p["logit"] for p in row), reverse=True)
        for p in row:  # each listed part is alpha[l, i, j] times what sense l of x_j says about the target
            assert p["from"] <= i and p["weight"] == pytest.approx(alpha[p["sense"], i, p["from"]].item(), abs=1e-6)
            said = table[ids[p["from"]], p["sense"], targets[i]]
            assert p["logit"] == pytest.approx((p["weight"] * said).item(), abs=1e-5)
    for v in range(V):  # the top characters of every sense of every token
        assert shown["sense_top_ids"][v] == net.sense_logits(v).topk(5).indices.tolist()


# ----- the CNN: receptive field and attribution -----------------------------------------------
def test_the_cnn_attribution_is_0_outside_the_receptive_field():
    net = tiny("cnn")
    rf = net.receptive_field
    text = "ROMEO:\nSay no to the night"  # 25 characters: longer than the field (8)
    ids = ids_of(text)
    data = views.look_inside(net, TOKENIZER, text, max_chars=40)
    att = torch.tensor(data["cnn"]["attribution"])  # (T, T)
    assert rf == 8 and len(ids) > 3 * rf and data["cnn"]["receptive_field"] == rf
    for t in range(len(ids)):
        inside = [j for j in range(len(ids)) if t - rf < j <= t]
        outside = [j for j in range(len(ids)) if j not in inside]
        assert att[t, outside].abs().max() == 0  # exactly: those inputs are not in the graph of this output
        assert (att[t, inside] > 0).all()
    assert data["cnn"]["target"] == ids[1:].tolist() + [data["top_ids"][-1][0]]


def test_the_attribution_is_the_gradient_norm_of_the_log_probability():
    """Row t, column j against a central difference of log p(target) along the gradient's direction
    (in float64): the directional derivative along a unit vector u = g / |g| is |g|."""
    net = tiny("cnn").double()
    ids = ids_of("ROMEO:\nSay no")
    targets = torch.cat([ids[1:], ids[:1]])
    att = views.input_attribution(net, ids, targets)
    t, j, h = 9, 5, 1e-5
    e = net.wte(ids[None]).detach()
    grad = torch.autograd.functional.jacobian(lambda x: log_p(net, ids, x, t, targets[t]), e)[0, j]
    u = grad / grad.norm()

    def moved(step: float) -> float:
        x = e.clone()
        x[0, j] += step * u
        return log_p(net, ids, x, t, targets[t]).item()

    assert abs((moved(h) - moved(-h)) / (2 * h) - att[t, j].item()) < 1e-6 * max(1.0, att[t, j].item())


def log_p(net, ids, embeddings, t, target):
    """log p(target | x_<=t) with the token embeddings replaced by ``embeddings``."""
    handle = net.wte.register_forward_hook(lambda m, inputs, out: embeddings)
    try:
        return views.predictions(net, ids)[t].log_softmax(-1)[target]
    finally:
        handle.remove()


def test_a_cnn_reads_a_long_passage_as_generation_does():
    """Past block_size each position's logits are those of its own last block_size characters
    (the receptive field equals the context here, so no zero padding reaches it)."""
    net = tiny("cnn")
    ids = ids_of("ROMEO:\nSay no to the night")
    with torch.no_grad():
        whole = views.predictions(net, ids)
        for t in range(net.block_size, len(ids)):
            assert torch.allclose(whole[t], net(ids[None, t - net.block_size + 1: t + 1])[0, -1], atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        net(ids[None])  # the model itself still guards its context


# ----- passages: limits, unknown characters, the default --------------------------------------
def test_passages_that_cannot_be_read_whole_are_refused_in_one_line():
    gpt, rnn = tiny("gpt"), tiny("rnn")
    for net, text, max_chars, says in [
        (gpt, PASSAGE + "e", None, "the passage has 17 characters; this GPT reads at most 16 at once: give"),
        (rnn, PASSAGE + "e", None, "reads at most 16 at once (--max_chars reads more)"),
        (gpt, PASSAGE, 40, "a GPT reads at most block_size=16"),
        (gpt, "R€", None, "'€'"),
        (gpt, "R", None, "it needs at least 2"),
    ]:
        with pytest.raises(UserError, match=re.escape(says)) as caught:
            views.look_inside(net, TOKENIZER, text, max_chars=max_chars)
        assert "\n" not in str(caught.value)
    assert views.look_inside(rnn, TOKENIZER, PASSAGE * 3, max_chars=48)["rnn"]["states"][0].__len__() == 48


def test_the_default_passage():
    net = tiny("gpt")
    assert views.default_passage(net, TOKENIZER) == views.PASSAGE[:16]
    assert views.default_passage(tiny("rnn"), TOKENIZER, max_chars=500) == views.PASSAGE
    digits = make_tokenizer("0123456789")
    small = scrambled(GPT(vocab_size=10, block_size=12, n_layer=1, n_head=2, n_embd=16))
    made = views.default_passage(small, digits)  # no character of PASSAGE: the model's own greedy text
    assert len(made) == 12 and made == views.default_passage(small, digits) and made[0] == "0"


def test_a_byte_model_is_read_in_bytes():
    tokenizer = make_tokenizer("", "byte")
    net = scrambled(RNN(vocab_size=256, block_size=8, n_layer=1, n_embd=16))
    data = views.look_inside(net, tokenizer, "Né\n", max_chars=8)
    assert data["ids"] == list("Né\n".encode()) and data["model"]["tokenizer"] == "byte"
    assert [data["vocab"][i] for i in data["ids"]] == ["N", "\\xc3", "\\xa9", "\n"]
    assert data["rnn"]["features"]["after_newline"] == [0, 0, 0, 1]
    with pytest.raises(UserError, match="the passage has 9 tokens; this RNN reads at most 8"):
        views.look_inside(net, tokenizer, "éééé!", max_chars=8)


# ----- the page -------------------------------------------------------------------------------
NETWORK_LOADS = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\s*\(|@import|\bfetch\s*\(|\bimport\s*\(|"""
                           r"""<link\b|https?://""", re.IGNORECASE)


def embedded(html: str) -> dict:
    found = re.findall(r'<script type="application/json" id="gptnano-data">(.*?)</script>', html, re.DOTALL)
    assert len(found) == 1
    return json.loads(found[0])


DOCUMENTED = {  # every key of the JSON, by where it sits; docs/inspect.md names each one
    "": ["format", "version", "doc", "source", "model", "text", "vocab", "ids", "surprisal", "mean_loss",
         "top_ids", "top_probs", "attention", "rnn", "backpack", "cnn"],
    "model": ["architecture", "parameters", "vocab_size", "block_size", "tokenizer"],
    "attention": ["n_layer", "n_head", "maps"],
    "rnn": ["n_hidden", "states", "saturation", "features", "finder"],
    "backpack": ["n_senses", "sense_top_ids", "sense_top_logits", "predicted", "actual"],
    "cnn": ["receptive_field", "kernel_size", "dilations", "target", "attribution", "norm"],
}


@pytest.mark.parametrize("arch", list(SIZES))
def test_the_page_embeds_the_data_and_loads_nothing(arch):
    text = PASSAGE[: SIZES[arch]["block_size"]]
    data = views.look_inside(tiny(arch), TOKENIZER, text, source="runs/x/best.ckpt")
    html = views.page(data)
    assert embedded(html) == data
    assert not NETWORK_LOADS.search(html), NETWORK_LOADS.search(html)
    assert set(data) == set(DOCUMENTED[""]) and set(data["model"]) == set(DOCUMENTED["model"])
    for view in ("attention", "rnn", "backpack", "cnn"):
        assert data[view] is None or set(data[view]) == set(DOCUMENTED[view]), view
    assert sum(data[v] is not None for v in ("attention", "rnn", "backpack", "cnn")) >= 1
    assert "docs/inspect.md" in html and "<title>gptnano inspect: " in html


def test_every_key_is_named_in_the_docs():
    doc = (Path(__file__).parents[1] / "docs" / "inspect.md").read_text(encoding="utf-8")
    for keys in DOCUMENTED.values():
        for key in keys:
            assert f"`{key}`" in doc, key


def test_text_cannot_break_out_of_the_page():
    chars = 'ab</script><script>alert(1)</script>&<!--'
    tokenizer = CharTokenizer.from_text(chars)
    net = scrambled(GPT(vocab_size=len(tokenizer), block_size=64, n_layer=1, n_head=2, n_embd=16))
    data = views.look_inside(net, tokenizer, chars, source="</title><b>")
    html = views.page(data)
    assert embedded(html) == data and html.count("</script>") == 2 and "<b>" not in html


def test_the_template_is_package_data():
    """A non-editable install carries views.html: pyproject.toml lists it, and page() reads it
    through importlib.resources (not a path beside the source)."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*gptnano = \["views\.html"\]', pyproject)
    assert (Path(views.__file__).parent / "views.html").is_file()


# ----- the command ----------------------------------------------------------------------------
def saved(path: Path, arch: str = "gpt", **sizes) -> Path:
    """A checkpoint file of a tiny scrambled network, as `gptnano fit` would store it."""
    init_args = {"vocab_size": V, **SIZES[arch], **sizes}
    net = tiny(arch, **sizes)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"net": {"class_path": f"gptnano.models.{type(net).__name__}",
                                             "init_args": init_args}, "vocab": TOKENIZER.vocab}}, path)
    return path


def one_error(ran) -> str:
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptnano: error: "), ran.stderr
    return lines[0]


def test_the_command_writes_one_page(gptnano, tmp_path):
    ckpt = saved(tmp_path / "checkpoints" / "tiny" / "best.ckpt")
    ran = gptnano(["inspect", "--ckpt_path", str(ckpt)], tmp_path)  # default passage, default file
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines() == ["gptnano: wrote inspect-tiny.html | GPT on 16 characters | mean loss "
                                               + ran.stdout.split("mean loss ")[1].strip()]
    data = embedded((tmp_path / "inspect-tiny.html").read_text(encoding="utf-8"))
    assert data["text"] == views.PASSAGE[:16] and data["source"] == str(ckpt) and data["attention"]
    (tmp_path / "scene.txt").write_text("ROMEO:\r\nSay no\r\n", encoding="utf-8")
    ran = gptnano(["inspect", "--ckpt_path", str(ckpt), "--text_file", "scene.txt", "--out", "p/q.html"], tmp_path)
    assert ran.returncode == 0 and embedded((tmp_path / "p" / "q.html").read_text())["text"] == "ROMEO:\nSay no\n"


def test_the_command_reads_an_exported_folder(gptnano, tmp_path):
    from gptnano.cli.export import main as export

    ckpt = saved(tmp_path / "checkpoints" / "r" / "last.ckpt", "rnn")
    export(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "exported")])
    ran = gptnano(["inspect", "--ckpt_path", "exported", "--text", PASSAGE * 2, "--max_chars", "32"], tmp_path)
    assert ran.returncode == 0, ran.stderr
    data = embedded((tmp_path / "inspect-exported.html").read_text(encoding="utf-8"))
    assert data["rnn"] and len(data["ids"]) == 32


def test_the_command_says_what_is_wrong_in_one_line(gptnano, tmp_path):
    ckpt = str(saved(tmp_path / "run" / "last.ckpt"))
    (tmp_path / "a-file").write_text("not a folder")
    for args, says in [
        (["--text", PASSAGE + "and more"], "the passage has 24 characters; this GPT reads at most 16 at once"),
        (["--text", "ROMEO€"], "characters not in the model's vocabulary: '€'"),
        (["--text", "ROMEO", "--out", "a-file/page.html"], "could not write a-file/page.html"),
        (["--text", "ROMEO", "--max_chars", "40"], "--max_chars: a GPT reads at most block_size=16"),
        (["--text_file", "missing.txt"], "text file not found"),
    ]:
        assert says in one_error(gptnano(["inspect", "--ckpt_path", ckpt, *args], tmp_path)), args
    assert not list(tmp_path.glob("*.html"))


def test_help_explains_every_option(gptnano, tmp_path):
    ran = gptnano(["inspect", "--help"], tmp_path)
    for option in ("--ckpt_path", "--text", "--text_file", "--out", "--max_chars"):
        assert option in ran.stdout
    assert "self-contained HTML page" in ran.stdout
