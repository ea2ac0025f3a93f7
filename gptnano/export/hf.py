"""`gptnano export --format hf`: the GPT as a Hugging Face `transformers` GPT-2.

gptnano's GPT is GPT-2's architecture (pre-LayerNorm blocks, fused q/k/v projection,
learned positions, tied head), so the export is a renaming: GPT-2 stores its linear
layers as ``Conv1D`` with the weight transposed, it always has biases (a GPT trained
with ``bias=False`` gets zero ones), and its GELU is named ``"gelu"`` for the exact
(erf) one that gptnano uses (``"gelu_new"`` would be the tanh approximation). Its
positions are the context length: GPT-2 refuses a longer input, where gptnano crops.

The tokenizer is a ``tokenizers`` file that transformers' ``AutoTokenizer`` loads
without custom code: one token per character (a WordLevel table over single characters,
no unknown token, so a character outside the vocabulary is an error as in gptnano), or
one per UTF-8 byte (GPT-2's byte-level alphabet, ids equal to byte values).
"""

import json
from pathlib import Path

import torch

from gptnano.errors import UserError
from gptnano.files import atomic_write
from gptnano.models.base import LanguageModel
from gptnano.models.gpt import GPT

NEEDS = "pip install -e '.[export]' (or pip install tokenizers)"
# The GPT's options that GPT-2 has no counterpart for (its other arguments map onto config.json,
# or, like use_sdpa and rope_base without rope, do not change what it computes): a GPT with one
# on is refused, naming it.
GPT2_LACKS = {"rope": "rotary positions", "qk_norm": "QK-norm", "embed_shortcut": "embedding shortcut",
              "logit_softcap": "logit soft-cap"}


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> a printable character standing for it. Bytes that
    are printable Latin-1 characters stand for themselves; the others (controls, space, ...)
    are moved, in order, to U+0100 and up, so no token text is whitespace or invisible."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    moved = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(moved)) for b in range(256)]


def tokenizer_files(tokenizer, max_length: int | None) -> dict[str, str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` encoding text exactly as ``tokenizer``
    (gptnano's char or byte tokenizer) does: same ids, no special tokens added, decoding back
    to the same text. ``max_length``: the context, if the model has one (transformers warns
    beyond it)."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise UserError(f"writing a tokenizer for transformers needs the tokenizers package: {NEEDS}") from None
    if tokenizer.kind == "byte":
        alphabet = byte_alphabet()
        hf = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))  # no merges: one token per byte
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()  # invalid UTF-8 decodes to U+FFFD, as in gptnano
    else:
        # No unk_token in the table: a character outside it is an error, never a silent stand-in.
        hf = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.vocab)}, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every code point alone
        hf.decoder = decoders.Fuse()  # join tokens with nothing between them
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if max_length is not None:
        config["model_max_length"] = max_length
    return {"tokenizer.json": hf.to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def gpt2_config(net: GPT, init_args: dict) -> dict:
    """config.json of the GPT-2 that computes what ``net`` computes."""
    dropout = float(init_args.get("dropout", 0.0))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": net.vocab_size,
        "n_positions": net.block_size,
        "n_embd": net.n_embd,
        "n_layer": net.n_layer,
        "n_head": net.blocks[0].mixer.n_head,
        "n_inner": 4 * net.n_embd,
        "activation_function": "gelu",  # exact GELU, as F.gelu
        "layer_norm_epsilon": net.ln_f.eps,
        "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
        "scale_attn_weights": True,  # 1/sqrt(head size), as gptnano
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # gptnano has no special tokens
        "dtype": "float32",
    }


def gpt2_weights(net: GPT) -> dict[str, torch.Tensor]:
    """``net``'s weights under GPT-2's names (``lm_head.weight`` left out: tied to ``wte``)."""
    def linear(prefix: str, layer: torch.nn.Linear) -> dict:
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        return {f"{prefix}.weight": layer.weight.t(), f"{prefix}.bias": bias}  # Conv1D: (in, out)

    def norm(prefix: str, ln: torch.nn.LayerNorm) -> dict:
        return {f"{prefix}.weight": ln.weight, f"{prefix}.bias": ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)}

    out = {"transformer.wte.weight": net.wte.weight, "transformer.wpe.weight": net.wpe.weight}
    for i, block in enumerate(net.blocks):
        h = f"transformer.h.{i}"
        out |= norm(f"{h}.ln_1", block.ln_1) | norm(f"{h}.ln_2", block.ln_2)
        out |= linear(f"{h}.attn.c_attn", block.mixer.c_attn) | linear(f"{h}.attn.c_proj", block.mixer.c_proj)
        out |= linear(f"{h}.mlp.c_fc", block.mlp.c_fc) | linear(f"{h}.mlp.c_proj", block.mlp.c_proj)
    out |= norm("transformer.ln_f", net.ln_f)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def write_hf(net: LanguageModel, init_args: dict, tokenizer, out: Path) -> list[Path]:
    """Write a folder that ``transformers.AutoModelForCausalLM.from_pretrained(out)`` and
    ``AutoTokenizer.from_pretrained(out)`` load, with no gptnano and no remote code; returns
    the files written.

    Raises:
        UserError: ``net`` is not a GPT (GPT-2 has no RNN, Backpack or CNN), a GPT with an
            option GPT-2 lacks (``GPT2_LACKS``), or the tokenizers package is missing.
        WriteError: a file could not be written.
    """
    from safetensors.torch import save

    if not isinstance(net, GPT):
        raise UserError(f"--format hf is not available for {type(net).__name__}: use safetensors or onnx")
    lacks = [f"{what} ({name})" for name, what in GPT2_LACKS.items() if getattr(net, name)]
    if lacks:
        off = " ".join(f"--model.net.{name} {'null' if name == 'logit_softcap' else 'false'}"
                       for name in GPT2_LACKS if getattr(net, name))
        raise UserError(f"--format hf writes a GPT-2, which has no {' and no '.join(lacks)}: "
                        f"export --format safetensors or onnx, or train a GPT-2-shaped model with {off}")
    files = tokenizer_files(tokenizer, net.block_size)  # before writing anything: it may need a package
    written = [atomic_write(out / "model.safetensors", save(gpt2_weights(net), metadata={"format": "pt"}))]
    written.append(atomic_write(out / "config.json", json.dumps(gpt2_config(net, init_args), indent=2) + "\n"))
    written += [atomic_write(out / name, text) for name, text in files.items()]
    return written
