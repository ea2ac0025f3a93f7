"""Reading checkpoints without Lightning: safely, with clear errors, and rebuilding
the network they describe (for tools such as `gptnano senses`)."""

import importlib
from pathlib import Path

import torch

from gptnano.errors import UserError
from gptnano.models.base import LanguageModel


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no pickle code runs) or explain why it is not one."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle ...
        first = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"{path} is not a readable gptnano checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "net" not in ckpt.get("hyper_parameters", {}):
        raise UserError(f"{path} is not a gptnano checkpoint (no model hyper-parameters in it)")
    return ckpt


def load_net(path: str) -> tuple[LanguageModel, str]:
    """The trained network of a checkpoint (in eval mode) and its vocabulary."""
    ckpt = read_checkpoint(path)
    spec = ckpt["hyper_parameters"]["net"]
    module, name = spec["class_path"].rsplit(".", 1)
    net = getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval(), ckpt["hyper_parameters"]["vocab"]
