"""`gptnano export --format safetensors`: a trained network as weights and plain settings.

The folder holds ``model.safetensors`` (the weights only; a tied weight once, under its
first name, re-tied on load because the network's constructor ties it) and
``config.json``, read back by ``gptnano.checkpoint.read_checkpoint`` like a checkpoint:

    {"format": "gptnano", "version": 1,
     "net": {"class_path": "gptnano.models.GPT", "init_args": {"vocab_size": 65, "block_size": 64, ...}},
     "tokenizer": {"kind": "char", "vocab": "\\n !$&',-.3:;?ABC..."},
     "sampling": {"max_new_tokens": 500, "temperature": 0.8, "top_k": null, "top_p": null, "sample_seed": null},
     "exported_from": {"checkpoint": "checkpoints/gpt/best.ckpt", "run_name": "gpt", "global_step": 1000}}
"""

import json
from pathlib import Path

from gptnano.checkpoint import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_VERSION, EXPORT_WEIGHTS, SAMPLING, weight_names
from gptnano.files import atomic_write
from gptnano.models import MODELS
from gptnano.models.base import LanguageModel


def class_path(net: LanguageModel) -> str:
    """The short path configs use (``gptnano.models.GPT``): it names the registry's class
    wherever the module defining it moves."""
    cls = type(net)
    if cls not in MODELS.values():
        raise TypeError(f"{cls.__name__} is not in gptnano's registry of architectures")
    return f"gptnano.models.{cls.__name__}"


def export_config(net: LanguageModel, init_args: dict, tokenizer, hparams: dict, exported_from: dict) -> dict:
    """config.json's content (see the module's docstring)."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "net": {"class_path": class_path(net), "init_args": {**init_args, "vocab_size": net.vocab_size}},
        "tokenizer": {"kind": tokenizer.kind, "vocab": tokenizer.vocab},
        "sampling": {k: hparams[k] for k in SAMPLING if k in hparams},
        "exported_from": exported_from,
    }


def write_safetensors(net: LanguageModel, init_args: dict, tokenizer, hparams: dict, out: Path,
                      exported_from: dict) -> list[Path]:
    """Write ``out/model.safetensors`` and ``out/config.json``; returns their paths.

    Args:
        net: The trained network (its weights are written as they are, fp32 as trained).
        init_args: Its constructor arguments, as the checkpoint saved them.
        tokenizer: Its tokenizer (``kind`` and ``vocab`` are written).
        hparams: The checkpoint's hyper-parameters (the sampling settings are kept).
        out: The folder (created if needed; files of an earlier export there are replaced).
        exported_from: Where it came from, recorded in config.json (plain values).

    Raises:
        WriteError: a file could not be written.
    """
    from safetensors.torch import save

    state = net.state_dict()
    stored = {key: state[key].detach().contiguous() for name, key in weight_names(net).items() if name == key}
    weights = save(stored, metadata={"format": "pt"})  # "pt": what loaders (transformers too) expect to see
    config = export_config(net, init_args, tokenizer, hparams, exported_from)
    # The weights first: an export killed midway leaves no config.json describing weights that are not there.
    return [atomic_write(out / EXPORT_WEIGHTS, weights),
            atomic_write(out / EXPORT_CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")]
