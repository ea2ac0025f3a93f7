"""The one safe way to read a checkpoint, for the CLI and for the tools alike.

Loading runs no code from the file: ``torch.load(..., weights_only=True)`` only
rebuilds tensors, numbers, strings, lists and dicts, and the network a checkpoint
names is built only if it is a gptnano architecture already known to this process
(the registry in ``gptnano/models``), with plain-valued constructor arguments that
its signature accepts. Weights that are not finite are refused too, by name. Anything
else is one ``UserError`` line. No Lightning here, so tools such as ``gptnano generate``
start fast.
"""

import inspect
from pathlib import Path
from typing import NamedTuple

import torch

from gptnano.data.tokenizer import make_tokenizer
from gptnano.errors import UserError
from gptnano.models import MODELS
from gptnano.models.base import LanguageModel

PLAIN = (bool, int, float, str, type(None))


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no pickle code runs) or explain why it is not one."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"checkpoint is a folder, not a file: {path}")
    if not p.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle ...
        first = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"{path} is not a readable gptnano checkpoint ({type(e).__name__}: {first})") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or not isinstance(ckpt.get("state_dict"), dict) or "net" not in hparams:
        raise UserError(f"{path} is not a gptnano checkpoint (no model hyper-parameters in it)")
    architecture(hparams["net"], path)  # refuse a foreign network before anyone builds it
    check_finite(ckpt["state_dict"], path)
    return ckpt


def check_finite(state_dict: dict, source: str | Path) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor: sampling from them
    fails deep inside torch (or, greedy, prints nonsense), and training cannot recover them."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
            raise UserError(f"{source} holds non-finite weights (NaN or infinity) in {name}: refusing to load it "
                            "(take an earlier checkpoint of the run)")


def _known_architectures() -> dict[str, type[LanguageModel]]:
    """Every class path that names a LanguageModel subclass already defined in this process."""
    known, todo = {}, list(LanguageModel.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        known[f"{cls.__module__}.{cls.__qualname__}"] = cls
    for cls in MODELS.values():  # the registry's short form, as configs write it
        known[f"gptnano.models.{cls.__name__}"] = cls
    return known


def architecture(spec, source: str | Path = "the checkpoint") -> tuple[type[LanguageModel], dict]:
    """Check a saved ``net`` entry (``{"class_path": ..., "init_args": {...}}``) without
    importing or calling anything: the class must be a known gptnano architecture and
    every argument a plain value its constructor takes. Returns (class, init_args)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise UserError(f"{source} is not a gptnano checkpoint (its network has no class_path)")
    cls = _known_architectures().get(spec["class_path"])
    if cls is None:
        names = ", ".join(c.__name__ for c in MODELS.values())
        raise UserError(f"{source} names {spec['class_path']!r}, which is not a gptnano architecture "
                        f"({names}): refusing to load it")
    init_args = spec.get("init_args") or {}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if not isinstance(init_args, dict) or any(
        k not in accepted or not isinstance(v, PLAIN) for k, v in init_args.items()
    ):
        raise UserError(f"{source} has constructor arguments that {cls.__name__} does not take "
                        f"(or that are not plain values): refusing to load it")
    return cls, dict(init_args)


def build_net(spec, state_dict: dict | None = None, source: str | Path = "the checkpoint") -> LanguageModel:
    """The network a checked ``net`` entry describes, with the weights of ``state_dict``
    (keys as the LightningModule saves them, ``net.`` + the network's own)."""
    cls, init_args = architecture(spec, source)
    net = cls(**init_args)  # a ConfigError (a UserError) if the sizes are impossible
    if state_dict is not None:
        state = {k.removeprefix("net."): v for k, v in state_dict.items() if k.startswith("net.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0][:200]
            raise UserError(f"the weights in {source} do not fit a {cls.__name__} with {init_args}: {first}") from None
    return net


class Loaded(NamedTuple):
    net: LanguageModel  # in eval mode
    tokenizer: object  # encode(str) -> ids, decode(ids) -> str
    hparams: dict  # the LightningModule's hyper-parameters (sampling settings and all)


def load_net(path: str | Path) -> Loaded:
    """The trained network of a checkpoint (in eval mode), its tokenizer and hyper-parameters."""
    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    net = build_net(hparams["net"], ckpt["state_dict"], path)
    vocab = hparams.get("vocab")
    if not isinstance(vocab, str):
        raise UserError(f"{path} has no vocabulary: it was not written by `gptnano fit`")
    tokenizer = make_tokenizer(vocab, hparams.get("tokenizer", "char"))
    if len(tokenizer) != net.vocab_size:
        raise UserError(f"{path}: its vocabulary has {len(tokenizer)} tokens but its network {net.vocab_size}")
    return Loaded(net.eval(), tokenizer, hparams)
