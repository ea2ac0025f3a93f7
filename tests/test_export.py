"""A trained model taken elsewhere (`gptnano export`) and brought back (a folder where a
checkpoint goes, `fit --init_from`): each format gives the logits gptnano gives, the
folder is read as safely as a checkpoint, and a new run started from a model keeps every
weight it had, growing the vocabulary only by new rows.

The models are tiny and their weights scrambled (large, far from init), written as a
checkpoint the way `gptnano fit` writes one, so each test starts in milliseconds and
a wrong mapping shows as a large difference."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptnano.checkpoint import load_net
from gptnano.cli.export import main as export
from gptnano.data.tokenizer import CharTokenizer, make_tokenizer
from gptnano.errors import UserError
from gptnano.models import MODELS
from gptnano.models.gpt import GPT
from gptnano.sampling import generate, generate_naive
from gptnano.train.steps import next_token_loss
from tests.helpers import make_text, scrambled

SIZES = {  # tiny, with context 16 (the CNN's receptive field covers it)
    "gpt": dict(block_size=16, n_layer=2, n_head=2, n_embd=16),
    "rnn": dict(block_size=16, n_layer=2, n_embd=16),
    "backpack": dict(block_size=16, n_layer=1, n_head=2, n_embd=16, n_senses=4),
    "cnn": dict(block_size=16, n_layer=4, n_embd=16, tie_weights=False),  # an untied head: stored twice
}
TEXT = make_text(4000)
SAMPLING = {"max_new_tokens": 12, "temperature": 1.0, "top_k": None, "top_p": None, "sample_seed": 3}


def trained(path: Path, arch: str = "gpt", vocab: str | None = None, kind: str = "char", seed: int = 0,
            **sizes) -> Path:
    """A checkpoint file as `gptnano fit` writes one (without optimizer state), scrambled weights."""
    vocab = ("".join(sorted(set(TEXT))) if vocab is None else vocab) if kind == "char" else ""
    init_args = {"vocab_size": len(make_tokenizer(vocab, kind)), **SIZES[arch], **sizes}
    torch.manual_seed(seed)
    net = scrambled(MODELS[arch](**init_args))
    hparams = {"net": {"class_path": f"gptnano.models.{MODELS[arch].__name__}", "init_args": init_args},
               "vocab": vocab, "tokenizer": kind, "learning_rate": 1e-3, **SAMPLING}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 7, "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": hparams}, path)
    return path


def exported(ckpt: Path, out: Path, fmt: str = "safetensors") -> Path:
    export(["--ckpt_path", str(ckpt), "--out", str(out), "--format", fmt])
    return out


def error_line(ran) -> str:
    assert ran.returncode == 2 and "Traceback" not in ran.stderr + ran.stdout, ran.stderr[-3000:]
    lines = ran.stderr.strip().splitlines()
    assert lines[-1].startswith("gptnano: error: "), ran.stderr[-2000:]
    return lines[-1]


# ----- safetensors: a folder that stands in for a checkpoint -------------------------------------
@pytest.mark.parametrize("arch", list(SIZES))
def test_safetensors_round_trip_is_exact(arch, tmp_path):
    ckpt = trained(tmp_path / "run" / "last.ckpt", arch)
    folder = exported(ckpt, tmp_path / "out")
    (net, tokenizer, _), (again, tokenizer2, hparams2) = load_net(ckpt), load_net(folder)
    idx = tokenizer.encode(TEXT[:16]).view(2, 8)
    with torch.no_grad():
        assert torch.equal(net(idx), again(idx))
    assert tokenizer2.vocab == tokenizer.vocab and {k: hparams2[k] for k in SAMPLING} == SAMPLING
    with safe_open(folder / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    tied = getattr(again, "lm_head", None) is not None and again.lm_head.weight is again.wte.weight
    assert tied == (arch in ("gpt", "rnn"))  # re-tied on load, where the architecture ties them
    assert ("lm_head.weight" in stored) == (arch == "cnn")  # a tied weight is stored once
    config = json.loads((folder / "config.json").read_text())
    assert config["net"]["class_path"] == f"gptnano.models.{type(net).__name__}"
    assert config["exported_from"] == {"checkpoint": str(ckpt), "run_name": "run", "global_step": 7}


def test_an_exported_folder_works_wherever_a_checkpoint_does(tmp_path, gptnano):
    """generate, predict, validate and senses take the folder, and say the same as from the file."""
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ckpt = trained(tmp_path / "gpt" / "last.ckpt")
    folder = exported(ckpt, tmp_path / "exported")
    sample = ["--prompt", "ROMEO:", "--seed", "5", "--max_new_tokens", "20"]
    from_file = gptnano(["generate", "--ckpt_path", str(ckpt), *sample], tmp_path)
    from_folder = gptnano(["generate", "--ckpt_path", str(folder), *sample], tmp_path)
    assert from_file.returncode == 0 and from_folder.stdout == from_file.stdout
    assert len(from_file.stdout) == len("ROMEO:") + 20 + 1
    predicted = gptnano(["predict", "--ckpt_path", str(folder), "--data.prompt", "ROMEO:", "--model.sample_seed", "5",
                         "--model.max_new_tokens", "20"], tmp_path)
    assert predicted.returncode == 0 and predicted.stdout == from_file.stdout, predicted.stderr[-2000:]
    validated = gptnano(["validate", "--ckpt_path", str(folder), "--data.path", "text.txt",
                         "--trainer.enable_progress_bar", "false"], tmp_path)
    assert validated.returncode == 0 and "val/loss" in validated.stdout, validated.stderr[-2000:]
    backpack = trained(tmp_path / "backpack.ckpt", "backpack")
    senses = [gptnano(["senses", "--ckpt_path", str(path), "--token", "a", "--sense", "1"], tmp_path)
              for path in (backpack, exported(backpack, tmp_path / "backpack"))]
    assert senses[0].returncode == 0 and senses[0].stdout == senses[1].stdout and "sense 1 x 0" in senses[0].stdout
    resumed = gptnano(["fit", "--ckpt_path", str(folder), "--data.path", "text.txt"], tmp_path)
    assert f"start a new run from it with --init_from {folder}" in error_line(resumed)


def _crafted_folder(folder: Path, config_change=None, tensors_change=None) -> Path:
    config = json.loads((folder / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    if config_change:
        config_change(config)
    if tensors_change:
        tensors_change(tensors)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    return folder


def _touch(marker: Path) -> dict:
    return {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}


def test_a_crafted_folder_is_refused_in_one_line(tmp_path, gptnano):
    ckpt = trained(tmp_path / "gpt.ckpt")
    marker = tmp_path / "pwned"
    cases = {  # what is crafted -> what the one line says
        "another class": (lambda c: c.update(net=_touch(marker)), None, "'os.system', which is not a gptnano"),
        "wrong shape": (None, lambda t: t.update({"wpe.weight": torch.zeros(8, 16)}),
                        r"tensor wpe.weight is torch.float32 [8, 16], but a GPT"),
        "missing tensor": (None, lambda t: t.pop("ln_f.bias"), "lacks the tensor ln_f.bias"),
        "extra tensor": (None, lambda t: t.update(extra=torch.zeros(1)), "holds a tensor extra"),
        "not finite": (None, lambda t: t["blocks.1.mlp.c_fc.weight"].__setitem__((0, 0), float("inf")),
                       "non-finite weights (NaN or infinity) in net.blocks.1.mlp.c_fc.weight"),
        "no format": (lambda c: c.pop("format"), None, 'has no "format": "gptnano"'),
        "other vocabulary": (lambda c: c["tokenizer"].update(vocab="abc"), None, "its tokenizer has 3 tokens but its"),
        "code in sampling": (lambda c: c["sampling"].update(top_k=_touch(marker)), None, '"sampling" may hold only'),
    }
    for name, (config_change, tensors_change, says) in cases.items():
        folder = _crafted_folder(exported(ckpt, tmp_path / name), config_change, tensors_change)
        with pytest.raises(UserError) as refused:
            load_net(folder)
        assert says in str(refused.value), (name, str(refused.value))
        assert says in error_line(gptnano(["generate", "--ckpt_path", str(folder)], tmp_path)), name
        if name in ("another class", "not finite"):  # through Lightning's own loading too
            assert says in error_line(gptnano(["predict", "--ckpt_path", str(folder)], tmp_path)), name
    assert not marker.exists()
    hf = exported(ckpt, tmp_path / "hf", "hf")
    assert "it is a transformers model" in error_line(gptnano(["generate", "--ckpt_path", str(hf)], tmp_path))


def test_export_refuses_what_it_cannot_write(tmp_path, gptnano, monkeypatch):
    rnn, gpt = trained(tmp_path / "rnn.ckpt", "rnn"), trained(tmp_path / "gpt.ckpt")
    ran = gptnano(["export", "--ckpt_path", str(rnn), "--out", str(tmp_path / "x"), "--format", "hf"], tmp_path)
    assert error_line(ran).endswith("--format hf is not available for RNN: use safetensors or onnx")
    rope = trained(tmp_path / "rope.ckpt", rope=True, logit_softcap=5.0)
    ran = gptnano(["export", "--ckpt_path", str(rope), "--out", str(tmp_path / "x"), "--format", "hf"], tmp_path)
    assert error_line(ran).endswith("--format hf writes a GPT-2, which has no rotary positions (rope) and no logit "
                                    "soft-cap (logit_softcap): export --format safetensors or onnx, or train a GPT-2-shaped "
                                    "model with --model.net.rope false --model.net.logit_softcap null")
    assert not (tmp_path / "x").exists()
    exported(gpt, tmp_path / "st")
    for out, says in [(tmp_path / "st", "already holds other files (config.json of another format)"),
                      (tmp_path / "gpt.ckpt", "is a file: give a folder")]:
        assert says in error_line(gptnano(["export", "--ckpt_path", str(gpt), "--out", str(out), "--format", "hf"],
                                          tmp_path))
    exported(gpt, tmp_path / "st")  # the same format again: replaced
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    ran = gptnano(["export", "--ckpt_path", str(gpt), "--out", str(tmp_path / "o"), "--format", "onnx"], tmp_path)
    assert "needs the onnxscript package: pip install -e '.[export]'" in error_line(ran)


# ----- transformers ---------------------------------------------------------------------------
def test_hf_knows_every_gpt_argument():
    """Each argument of the GPT either maps onto GPT-2's config.json, changes nothing GPT-2 computes
    (use_sdpa; rope_base acts only with rope), or is an option GPT-2 lacks, refused by name: a new
    option cannot slip through the export as a GPT-2 that computes something else."""
    import inspect

    from gptnano.export.hf import GPT2_LACKS

    expressed = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "use_sdpa", "rope_base"}
    assert set(inspect.signature(GPT).parameters) == expressed | set(GPT2_LACKS)


def test_hf_gives_gptnanos_logits_and_greedy_text(tmp_path, gptnano):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = trained(tmp_path / "gpt.ckpt", bias=False)  # GPT-2 always has biases: zeros stand in
    folder = exported(ckpt, tmp_path / "hf", "hf")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    net, ours, _ = load_net(ckpt)
    prompt = "KING HENRY:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(ids[0], ours.encode(prompt))
    batch = ours.encode(TEXT[:48]).view(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, net(batch), rtol=0, atol=1e-5)
    new = 16 - len(prompt)  # prompt and continuation within the context
    greedy = model.generate(ids, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids))
    ran = gptnano(["generate", "--ckpt_path", str(ckpt), "--prompt", prompt, "--temperature", "0",
                   "--max_new_tokens", str(new)], tmp_path)
    assert ran.stdout == tokenizer.decode(greedy[0]) + "\n"


@pytest.mark.e2e  # transformers' start-up
@pytest.mark.parametrize("kind", ["char", "byte"])
def test_hf_tokenizer_round_trips_accents_and_emoji(kind, tmp_path):
    from transformers import AutoTokenizer

    text = "Zoë's café, naïve Ærø — 👍🏽 ok 😀!\n\tEnd."
    ckpt = trained(tmp_path / "gpt.ckpt", vocab=CharTokenizer.from_text(text).vocab, kind=kind)
    hf = AutoTokenizer.from_pretrained(exported(ckpt, tmp_path / "hf", "hf"))
    ours = load_net(ckpt).tokenizer
    ids = hf(text)["input_ids"]
    assert ids == ours.encode(text).tolist() and hf.decode(ids) == text
    if kind == "char":
        with pytest.raises(Exception, match="UNK"):  # no stand-in for an unknown character: an error
            hf("Zoë?")
    else:
        assert hf.decode([0xE2, 0x82, 65]) == ours.decode([0xE2, 0x82, 65]) == "\ufffdA"


# ----- the GPT's newer options, wherever a checkpoint goes --------------------------------------------
OPTIONS = dict(rope=True, qk_norm=True, embed_shortcut=True, logit_softcap=5.0)


def test_a_gpt_with_every_option_generates_predicts_and_starts_a_run(tmp_path, gptnano, monkeypatch):
    """The options are plain constructor arguments in the checkpoint: generate and predict rebuild
    the network from them and write what the cached sampler draws from it, an export folder
    gives the same logits, and `fit --init_from` keeps them with the weights (a typed other value
    is refused, also for a checkpoint written before the option existed, which had it off)."""
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ckpt = trained(tmp_path / "opts" / "last.ckpt", **OPTIONS)
    net, tokenizer, _ = load_net(ckpt)
    assert all(getattr(net, k) == v for k, v in OPTIONS.items()) and net.wpe is None
    again = load_net(exported(ckpt, tmp_path / "folder")).net
    idx = tokenizer.encode(TEXT[:32]).view(2, 16)
    with torch.no_grad():
        assert torch.equal(net(idx), again(idx))
    greedy = generate(net, tokenizer.encode("ROMEO:")[None], 30, temperature=0)  # past the context of 16
    assert torch.equal(greedy, generate_naive(net, tokenizer.encode("ROMEO:")[None], 30, temperature=0))
    ran = gptnano(["generate", "--ckpt_path", str(ckpt), "--prompt", "ROMEO:", "--temperature", "0",
                   "--max_new_tokens", "30"], tmp_path)
    assert ran.returncode == 0 and ran.stdout == tokenizer.decode(greedy[0].tolist()) + "\n", ran.stderr[-2000:]
    predicted = gptnano(["predict", "--ckpt_path", str(ckpt), "--data.prompt", "ROMEO:", "--model.temperature", "0",
                         "--model.max_new_tokens", "30"], tmp_path)
    assert predicted.returncode == 0 and predicted.stdout == ran.stdout, predicted.stderr[-2000:]
    cli = _cli(["--init_from", str(ckpt), "--data.path", "text.txt", *FIT], tmp_path, monkeypatch)
    assert all(getattr(cli.model.net, k) == v for k, v in OPTIONS.items())
    for name, weight in net.state_dict().items():
        assert torch.equal(cli.model.net.state_dict()[name], weight), name
    refused = gptnano(["fit", "--init_from", str(ckpt), "--data.path", "text.txt", "--model.net.rope", "false"],
                      tmp_path)
    assert "cannot take rope=False (its weights: True)" in error_line(refused)
    old = trained(tmp_path / "old.ckpt")  # its init_args name none of the options, as before they existed
    assert not set(OPTIONS) & set(torch.load(old, weights_only=True)["hyper_parameters"]["net"]["init_args"])
    # Without the check, rope would start from these weights less their learned positions, silently.
    refused = gptnano(["fit", "--init_from", str(old), "--data.path", "text.txt", "--model.net.rope", "true"],
                      tmp_path)
    assert "cannot take rope=True (its weights: False)" in error_line(refused)


# ----- ONNX -------------------------------------------------------------------------------------
@pytest.mark.e2e  # torch's ONNX exporter: seconds per model
@pytest.mark.parametrize("arch", list(SIZES))
def test_onnx_gives_gptnanos_logits_at_other_lengths(arch, tmp_path):
    """Exported at length 8, run at other lengths and batch sizes: up to the context of 16 for the
    models with one, and past it for the RNN, whose recurrence exports as a loop."""
    import onnxruntime

    # One layer where the context allows (export time grows with depth; the CNN's 4 reach 16 positions).
    ckpt = trained(tmp_path / f"{arch}.ckpt", arch, n_layer=4 if arch == "cnn" else 1)
    folder = exported(ckpt, tmp_path / "onnx", "onnx")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    net = load_net(ckpt).net
    for batch, length in [(1, 16), (3, 5), (2, 1)] + ([(2, 40)] if arch == "rnn" else []):
        idx = torch.randint(0, net.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
        (logits,) = session.run(None, {"idx": idx.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), net(idx), rtol=0, atol=2e-5)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["gptnano.vocab"] == load_net(ckpt).tokenizer.vocab
    assert meta["gptnano.max_context"] == ("" if arch == "rnn" else "16")


@pytest.mark.e2e  # torch's ONNX exporter: seconds per model
def test_onnx_gives_the_logits_of_a_gpt_with_every_option(tmp_path):
    """Rotary positions, QK-norm, the shortcut and the soft-cap all export: onnxruntime gives
    gptnano's logits at lengths other than the one traced."""
    import onnxruntime

    ckpt = trained(tmp_path / "gpt.ckpt", n_layer=1, **OPTIONS)
    session = onnxruntime.InferenceSession(str(exported(ckpt, tmp_path / "onnx", "onnx") / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    net = load_net(ckpt).net
    for batch, length in [(1, 16), (3, 5), (2, 1)]:
        idx = torch.randint(0, net.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
        (logits,) = session.run(None, {"idx": idx.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), net(idx), rtol=0, atol=2e-5)


# ----- fit --init_from ----------------------------------------------------------------------------
NEW_TEXT = TEXT + "the king ~ë\n" * 20  # two characters the model has never seen: '~' and 'ë'
FIT = ["--data.batch_size", "4", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
       "--model.warmup_steps", "0", "--model.learning_rate", "3e-3", "--model.lr_decay_steps", "8",
       "--trainer.val_check_interval", "100"]


def _cli(args: list[str], cwd: Path, monkeypatch):
    """The CLI's classes, built as `gptnano fit ARGS` builds them, before any step."""
    from gptnano.cli.lightning import GPTNanoCLI

    monkeypatch.chdir(cwd)
    return GPTNanoCLI(args=args, run=False)


def test_init_from_keeps_every_old_row_and_appends_new_characters(tmp_path, monkeypatch):
    (tmp_path / "new.txt").write_text(NEW_TEXT, encoding="utf-8")
    source = trained(tmp_path / "checkpoints" / "shakespeare" / "best.ckpt")
    old = load_net(source)
    cli = _cli(["--init_from", str(source), "--data.path", "new.txt", *FIT], tmp_path, monkeypatch)
    net, vocab = cli.model.net, cli.model.hparams.vocab
    assert vocab == old.tokenizer.vocab + "~ë" and cli.datamodule.vocab == vocab  # old order, new appended
    assert cli.config.run_name == "shakespeare-ft"
    n = len(old.tokenizer)
    for name, weight in old.net.state_dict().items():  # before the first step: every old row as trained
        mine = net.state_dict()[name]
        assert torch.equal(mine[:n] if name in ("wte.weight", "lm_head.weight") else mine, weight), name
    # The new rows are a fresh model's: what the run's seed (1337) draws for a new GPT of this vocabulary.
    torch.manual_seed(1337)
    assert torch.equal(net.wte.weight[n:], GPT(vocab_size=len(vocab), **SIZES["gpt"]).wte.weight[n:])
    assert net.lm_head.weight is net.wte.weight  # still tied


def test_init_from_a_byte_model_or_a_folder_adds_nothing(tmp_path, monkeypatch):
    (tmp_path / "new.txt").write_text(NEW_TEXT, encoding="utf-8")
    source = exported(trained(tmp_path / "b.ckpt", "rnn", kind="byte"), tmp_path / "bytes-rnn")
    cli = _cli(["--init_from", str(source), "--data.path", "new.txt", "--model.net.block_size", "32", *FIT],
               tmp_path, monkeypatch)
    assert cli.config.run_name == "bytes-rnn-ft" and cli.datamodule.tokenizer_kind == "byte"
    assert cli.model.net.block_size == 32  # the RNN's training context is the new run's to choose
    for name, weight in load_net(source).net.state_dict().items():
        assert torch.equal(cli.model.net.state_dict()[name], weight), name


def leaves(tree) -> list:
    """Every value of nested dicts and lists, in order, tensors as (dtype, shape, values): equal
    lists mean bit-for-bit equal states."""
    if isinstance(tree, dict):
        return [(k, leaf) for k in sorted(tree, key=str) for leaf in leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in leaves(item)]
    if isinstance(tree, torch.Tensor):
        return [(tree.dtype, tuple(tree.shape), tree.flatten().tolist())]
    return [tree]


def _loss(net, tokenizer, text: str) -> float:
    ids = tokenizer.encode(text)
    with torch.no_grad():
        return next_token_loss(net(ids[:-1].view(40, 16)), ids[1:].view(40, 16)).item()


def test_init_from_learns_the_new_text_and_resumes_bit_exactly(tmp_path, gptnano, monkeypatch):
    """Straight to step 8, or 4 then `--ckpt_path last` to 8: the same weights and optimizer
    state, as for any run; and the loss on the new text falls from where the model started."""
    (tmp_path / "new.txt").write_text(NEW_TEXT, encoding="utf-8")
    source = trained(tmp_path / "src.ckpt")
    common = ["fit", "--data.path", "new.txt", *FIT]
    for args in ([*common, "--init_from", str(source), "--run_name", "straight", "--trainer.max_steps", "8"],
                 [*common, "--init_from", str(source), "--run_name", "split", "--trainer.max_steps", "4"],
                 [*common, "--ckpt_path", "last", "--run_name", "split", "--trainer.max_steps", "8"]):
        ran = gptnano(args, tmp_path)
        assert ran.returncode == 0, ran.stderr[-3000:]
    straight, split = (torch.load(tmp_path / "checkpoints" / name / "last.ckpt", weights_only=True)
                       for name in ("straight", "split"))
    assert straight["global_step"] == split["global_step"] == 8
    assert straight["hyper_parameters"]["vocab"] == split["hyper_parameters"]["vocab"] == load_net(
        source).tokenizer.vocab + "~ë"
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert leaves(straight[key]) == leaves(split[key]), key
    start = _cli([*common[1:], "--init_from", str(source), "--run_name", "start"], tmp_path, monkeypatch)
    after = load_net(tmp_path / "checkpoints" / "straight" / "last.ckpt")
    text = NEW_TEXT[-16 * 40 - 1:]  # the end of the text: the new characters in it
    assert _loss(after.net, after.tokenizer, text) < _loss(start.model.net.eval(), after.tokenizer, text)
