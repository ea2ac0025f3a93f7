"""The one safe way to read a checkpoint, for the CLI and for the tools alike.

A checkpoint is a file written by ``gptnano fit`` (Lightning's, with the optimizer's
state) or a folder written by ``gptnano export`` (``model.safetensors`` and
``config.json``: the weights alone, read into the same shape of dict).

Loading runs no code from the file: ``torch.load(..., weights_only=True)`` only
rebuilds tensors, numbers, strings, lists and dicts, a safetensors file holds only
tensors and a JSON header, and the network a checkpoint names is built only if it is
a gptnano architecture already known to this process (the registry in
``gptnano/models``), with plain-valued constructor arguments that its signature
accepts. Weights that are not finite are refused too, by name, and weights of a layout
gptnano has outgrown, with the reason. Anything else is one ``UserError`` line. No
Lightning here, so tools such as ``gptnano generate`` start fast.
"""

import copy
import inspect
import json
from pathlib import Path
from typing import NamedTuple

import torch

from gptnano.data.tokenizer import TOKENIZERS, make_tokenizer
from gptnano.errors import UserError
from gptnano.models import MODELS
from gptnano.models.base import LanguageModel

PLAIN = (bool, int, float, str, type(None))

# An exported folder (``gptnano export --format safetensors``): its two files, and the values
# of config.json that tell it from other folders holding a config.json (a transformers export).
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_FORMAT = "gptnano"
EXPORT_VERSION = 1
# The LightningModule's hyper-parameters an export keeps: how to sample. The rest (learning
# rates, schedule) belong to a training run, and a run started from an export sets its own.
SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "sample_seed")

# Layouts of weights that an earlier gptnano wrote and this one cannot use: (architecture,
# state_dict keys only that layout has, why). Refused with the reason rather than torch's
# list of missing and unexpected keys.
OBSOLETE_LAYOUTS = (
    ("Backpack", ("net.sense_net.sense_proj.", "net.sense_net.ln."),  # a sense_proj Linear after one ln + mlp
     "this Backpack was trained with gptnano's earlier sense network, Linear(e + MLP(LN(e))), before it followed "
     "the paper; its weights do not carry over: retrain it with the current version"),
)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file (``weights_only=True``: no pickle code runs) or an exported folder,
    or explain in one line why it is not one.

    Returns:
        A dict with ``state_dict`` (``net.`` + the network's keys, tied weights under each of
        their names) and ``hyper_parameters`` (``net``: class_path and init_args, ``vocab``,
        ``tokenizer``, the sampling settings, and for a file everything else the run was given).
        A folder's dict also has ``exported_from``: what config.json says it was exported from.

    Raises:
        UserError: a missing or unreadable file, a folder that is no export, a network that is
            not a gptnano architecture, weights of an obsolete layout, or a weight that is NaN or infinite.
    """
    p = Path(path)
    if p.is_dir():
        ckpt = _read_folder(p)
    elif not p.is_file():
        raise UserError(f"checkpoint not found: {path}")
    else:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, not a torch file, unsafe pickle ...
            first = (str(e).splitlines() or [""])[0][:200]
            raise UserError(f"{path} is not a readable gptnano checkpoint ({type(e).__name__}: {first})") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or not isinstance(ckpt.get("state_dict"), dict) or "net" not in hparams:
        raise UserError(f"{path} is not a gptnano checkpoint (no model hyper-parameters in it)")
    cls, _ = architecture(hparams["net"], path)  # refuse a foreign network before anyone builds it
    refuse_obsolete(cls, ckpt["state_dict"], path)
    check_finite(ckpt["state_dict"], path)
    return ckpt


def refuse_obsolete(cls: type[LanguageModel], state_dict: dict, source: str | Path) -> None:
    """Refuse, in one line that says why, weights of a layout this gptnano has outgrown
    (``OBSOLETE_LAYOUTS``). Every command reads checkpoints through ``read_checkpoint``,
    Lightning's loading included (``train.checkpointing.AtomicCheckpointIO``), so this one
    check covers them all."""
    for name, keys, why in OBSOLETE_LAYOUTS:
        if cls.__name__ == name and any(k.startswith(keys) for k in state_dict):
            raise UserError(f"{source}: {why}")


def check_finite(state_dict: dict, source: str | Path) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor: sampling from them
    fails deep inside torch (or, greedy, prints nonsense), and training cannot recover them."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
            raise UserError(f"{source} holds non-finite weights (NaN or infinity) in {name}: refusing to load it "
                            "(take an earlier checkpoint of the run)")


def _read_folder(folder: Path) -> dict:
    """An exported folder as a checkpoint dict (see ``read_checkpoint``)."""
    config_file = folder / EXPORT_CONFIG
    if not config_file.is_file():
        raise UserError(f"checkpoint is a folder, not a file nor a `gptnano export` folder (it has no "
                        f"{EXPORT_CONFIG}): {folder}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{config_file} is not readable JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        hint = (": it is a transformers model (gptnano export --format hf); gptnano reads --format safetensors "
                "exports" if isinstance(config, dict) and "model_type" in config else "")
        raise UserError(f"{folder} is not a gptnano export (its {EXPORT_CONFIG} has no \"format\": "
                        f"\"{EXPORT_FORMAT}\"){hint}")
    if config.get("version") != EXPORT_VERSION:
        raise UserError(f"{folder} is an export of version {config.get('version')!r}; this gptnano reads "
                        f"version {EXPORT_VERSION}")
    cls, init_args = architecture(config.get("net"), folder)
    tokenizer, sampling = config.get("tokenizer"), config.get("sampling", {})
    if (not isinstance(tokenizer, dict) or tokenizer.get("kind") not in TOKENIZERS
            or not isinstance(tokenizer.get("vocab"), str)):
        raise UserError(f"{config_file} has no tokenizer (a \"kind\" of {', '.join(TOKENIZERS)} and a \"vocab\")")
    if not isinstance(sampling, dict) or any(k not in SAMPLING or not isinstance(v, PLAIN) for k, v in sampling.items()):
        raise UserError(f"{config_file}: \"sampling\" may hold only plain values of {', '.join(SAMPLING)}")
    state_dict, vocab_size = _read_weights(folder, cls, init_args)
    n_tokens = len(make_tokenizer(tokenizer["vocab"], tokenizer["kind"]))  # a UserError for a repeated character
    if n_tokens != vocab_size:
        raise UserError(f"{config_file}: its tokenizer has {n_tokens} tokens but its network {vocab_size}")
    hparams = {"net": {"class_path": config["net"]["class_path"], "init_args": init_args},
               "vocab": tokenizer["vocab"], "tokenizer": tokenizer["kind"], **sampling}
    exported_from = config.get("exported_from")
    return {"state_dict": state_dict, "hyper_parameters": hparams,
            "exported_from": exported_from if isinstance(exported_from, dict) else {}}


def weight_names(net: LanguageModel) -> dict[str, str]:
    """Every state_dict key of ``net`` -> the key its tensor is stored under in an export: itself,
    or for a tied weight (the GPT's output head is its token embedding) the first key of that tensor."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(t), name) for name, t in net.state_dict(keep_vars=True).items()}


def _read_weights(folder: Path, cls: type[LanguageModel], init_args: dict) -> tuple[dict, int]:
    """model.safetensors, checked against the network config.json describes: the same tensor
    names and shapes, or one line saying which differs. Returns the ``net.`` state_dict and
    the network's vocabulary size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / EXPORT_WEIGHTS
    if not path.is_file():
        raise UserError(f"{folder} has a {EXPORT_CONFIG} but no {EXPORT_WEIGHTS}")
    try:
        stored = load_file(path)  # tensors and a JSON header only: nothing in it can run
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({str(e)[:200]})") from None
    with torch.device("meta"):  # the network's shapes, without allocating or initialising anything
        expected = cls(**init_args)
    names = weight_names(expected)
    shapes = expected.state_dict()
    described = f"a {cls.__name__} with {init_args}"
    missing, extra = sorted(set(names.values()) - stored.keys()), sorted(stored.keys() - set(names.values()))
    if missing:
        raise UserError(f"{path} lacks the tensor {missing[0]} that {described} needs")
    if extra:
        raise UserError(f"{path} holds a tensor {extra[0]} that {described} does not have")
    for key in sorted(set(names.values())):
        if stored[key].shape != shapes[key].shape or not stored[key].is_floating_point():
            raise UserError(f"{path}: tensor {key} is {stored[key].dtype} {list(stored[key].shape)}, but {described} "
                            f"needs a float tensor of shape {list(shapes[key].shape)}")
    return {f"net.{name}": stored[key] for name, key in names.items()}, expected.vocab_size


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


def fixed_args(cls: type[LanguageModel], init_args: dict) -> dict:
    """The network arguments a trained network's weights fix: every constructor argument but its
    ``run_settings`` and the vocabulary size. One the checkpoint does not name came into gptnano after
    it, with a default that computes what the network did then (a new option, off): that default."""
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if k != "self" and p.default is not inspect.Parameter.empty}
    return {k: v for k, v in {**defaults, **init_args}.items() if k not in cls.run_settings and k != "vocab_size"}


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


def load_grown(net: LanguageModel, state_dict: dict, source: str | Path) -> list[str]:
    """Copy the weights of ``state_dict`` (``net.`` keys) into ``net``, a network of the same
    architecture and sizes whose vocabulary may be larger (``fit --init_from`` on a text with
    new characters). A tensor with a vocabulary dimension (the token embedding, the output
    head, tied or not) gets its old rows copied and keeps ``net``'s own fresh rows after them;
    every other tensor is copied whole. Returns the names of the tensors that grew.

    Raises:
        UserError: a tensor is missing, or differs in shape other than by growing the vocabulary.
    """
    grown = []
    state = {k.removeprefix("net."): v for k, v in state_dict.items() if k.startswith("net.")}
    with torch.no_grad():
        for name, target in net.state_dict(keep_vars=True).items():
            src = state.get(name)
            if src is None:
                raise UserError(f"{source} has no tensor {name} for the new run's {type(net).__name__}")
            if src.shape == target.shape:
                target.copy_(src)
                continue
            differ = [d for d, (a, b) in enumerate(zip(src.shape, target.shape)) if a != b]
            if (src.dim() != target.dim() or len(differ) != 1 or target.shape[differ[0]] != net.vocab_size
                    or src.shape[differ[0]] > net.vocab_size):
                raise UserError(f"{source}: tensor {name} has shape {list(src.shape)}, the new run's network needs "
                                f"{list(target.shape)}: only the vocabulary can grow")
            target.narrow(differ[0], 0, src.shape[differ[0]]).copy_(src)  # the old rows; new ones stay fresh
            grown.append(name)
    return grown


def run_config(ckpt: dict) -> dict:
    """The config the checkpoint's run was parsed into, as a nested dict of plain values (what
    ``gptnano fit --print_config`` shows: ``trainer``, ``model``, ``data``, ``run_name``, ...),
    with the tokenizer it trained with in ``data.vocab`` and ``data.tokenizer``.

    ``gptnano fit`` keeps it in ``ckpt["gptnano"]["config"]`` (gptnano/train/logger.py,
    ``RunConfig``). For a checkpoint written before it did (and an exported folder), the config is
    rebuilt from what the file holds: the model's hyper-parameters, the data module's settings,
    the run's name and seed.
    """
    record = ckpt.get("gptnano") or {}
    hparams = ckpt["hyper_parameters"]
    if isinstance(record.get("config"), dict):
        config = copy.deepcopy(record["config"])
    else:
        model = {k: v for k, v in hparams.items() if k not in ("vocab", "tokenizer") and not k.startswith("_")}
        data = {k: v for k, v in (ckpt.get("ShakespeareDataModule") or {}).items() if isinstance(v, PLAIN)}
        config = {"model": copy.deepcopy(model), "data": data}
        if isinstance(record.get("run_name"), str):
            config["run_name"] = record["run_name"]
        if isinstance(record.get("seed"), int):
            config["seed_everything"] = record["seed"]
    config.setdefault("data", {}).update(vocab=hparams.get("vocab") or None, tokenizer=hparams.get("tokenizer", "char"))
    return config


# ----- what a command starting from a checkpoint takes from it, and may not change -------------
# The checkpoint's config (``run_config``) is the parser's base for fit --ckpt_path, validate, test
# and predict (gptnano/cli/lightning.py); the command line applies over it, except the command's
# own settings and the machine's, which a checkpoint never supplies. (The
# precision of a run resumed on the same kind of device is kept by the facts, docs/reliability.md.)
NEVER_FROM_CHECKPOINT = ("ckpt_path", "init_from", "trainer.fast_dev_run", "trainer.accelerator", "trainer.devices",
                         "trainer.strategy", "trainer.num_nodes", "trainer.precision")
WEIGHTS = "the weights were trained for the checkpoint's"
# What a command starting from a checkpoint may not change: key -> (the commands refusing it, why).
# Every other setting applies as parsed. The network's sizes are refused the same way (``refusals``).
REFUSED = {
    "data.vocab": ("every", f"{WEIGHTS} vocabulary"),
    "data.tokenizer": ("every", f"{WEIGHTS} tokenizer"),
    "model.optimizer": ("fit", "the saved optimizer state is the other optimizer's"),
    "checkpoint.monitor": ("fit", "best.ckpt and its score are kept by this metric"),
    "checkpoint.mode": ("fit", "best.ckpt and its score are kept by this order"),
    "checkpoint.every_n_train_steps": ("fit", "Lightning keys the saved best-model state by it"),
    "early_stopping.monitor": ("fit", "the saved best score and wait count are of this metric"),
    "early_stopping.mode": ("fit", "the saved best score and wait count are kept by this order"),
    "data.val_fraction": ("fit", "best.ckpt's score and early stopping compare losses on this validation split"),
    "data.test_fraction": ("fit", "it moves the validation split that best.ckpt's score was measured on"),
    "data.val_tokens": ("fit", "best.ckpt's score and early stopping compare losses on these validation windows"),
}


def without(config: dict, keys=NEVER_FROM_CHECKPOINT) -> dict:
    """A nested config less the dotted ``keys``."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in keys:
        head, _, tail = key.partition(".")
        if tail and isinstance(config.get(head), dict):
            config[head].pop(tail, None)
        elif not tail:
            config.pop(head, None)
    return config


def flat(config: dict, prefix: str = "") -> dict:
    """``{"model": {"net": {"init_args": {"n_layer": 4}}}}`` -> ``{"model.net.n_layer": 4}``."""
    out = {}
    for key, value in config.items():
        if key == "init_args":
            out.update(flat(value or {}, prefix))
        elif isinstance(value, dict) and key not in ("callbacks", "logger", "plugins"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def refusals(saved: dict, asked: dict, *, fitting: bool, fixed: set[str], source: str) -> None:
    """Refuse, in one line, the first setting a command starting from a checkpoint may not change.

    Args:
        saved: The checkpoint's config (``run_config``), the vocabulary and tokenizer in ``data``.
        asked: The config this command parsed, on top of ``saved``.
        fitting: Whether the command is ``fit`` (a resume): only then are the "fit" rows refused.
        fixed: The network's arguments its weights fix (not its ``run_settings``).
        source: The checkpoint's path, for messages.

    Raises:
        UserError: naming the setting, both values and why.
    """
    old, new = flat(saved), flat(asked)
    old_net, new_net = (str(c.get("model.net.class_path", "")).rsplit(".", 1)[-1] for c in (old, new))
    if new_net and old_net and new_net != old_net:
        raise UserError(f"{source} holds a {old_net} network, but --config or --model.net ask for {new_net}: "
                        f"give the {old_net}'s config, or none")
    sizes = {k: (old[f"model.net.{k}"], new.get(f"model.net.{k}")) for k in sorted(fixed) if f"model.net.{k}" in old}
    if changed := {k: (a, b) for k, (a, b) in sizes.items() if a != b}:
        shown = ", ".join(f"{k}={b} (saved: {a})" for k, (a, b) in changed.items())
        raise UserError(f"{source} cannot take {shown}: its saved weights have other shapes "
                        "(start a new run with --run_name to change the network)")
    for key, (who, why) in REFUSED.items():
        before, after = old.get(key), new.get(key)
        if key == "checkpoint.every_n_train_steps":  # None and 0 both mean "off"
            before, after = before or 0, after or 0
        if key in old and before != after and (fitting or who == "every"):
            raise UserError(f"--{key} {after} cannot change on {'resume' if fitting else 'a checkpoint'} (the run's "
                            f"is {before}): {why}; start a new run with --run_name to change it")


def step_of(ckpt: dict | None) -> int:
    """The optimizer step a checkpoint's weights had: a file's ``global_step``, an export's recorded
    one; 0 when it says none."""
    step = (ckpt or {}).get("global_step", ((ckpt or {}).get("exported_from") or {}).get("global_step"))
    return int(step) if isinstance(step, int) else 0


def run_name(path: str | Path, ckpt: dict | None = None) -> str:
    """The run a checkpoint comes from: for a file, the name its run recorded (its config's
    ``run_name``), else its folder's (``checkpoints/<run>/`` holds a run's files); an exported
    folder is named by its exporter."""
    p = Path(path).resolve()
    if p.is_dir():
        return p.name
    recorded = run_config(ckpt).get("run_name") if ckpt else None
    return recorded if isinstance(recorded, str) and recorded else p.parent.name


class Loaded(NamedTuple):
    net: LanguageModel  # in eval mode
    tokenizer: object  # encode(str) -> ids, decode(ids) -> str
    hparams: dict  # the LightningModule's hyper-parameters (sampling settings and all)


def loaded(ckpt: dict, path: str | Path) -> Loaded:
    """The trained network (in eval mode), tokenizer and hyper-parameters of a checkpoint dict
    that ``read_checkpoint`` returned for ``path``."""
    hparams = ckpt["hyper_parameters"]
    net = build_net(hparams["net"], ckpt["state_dict"], path)
    vocab = hparams.get("vocab")
    if not isinstance(vocab, str):
        raise UserError(f"{path} has no vocabulary: it was not written by `gptnano fit`")
    tokenizer = make_tokenizer(vocab, hparams.get("tokenizer", "char"))
    if len(tokenizer) != net.vocab_size:
        raise UserError(f"{path}: its vocabulary has {len(tokenizer)} tokens but its network {net.vocab_size}")
    # The sampling settings a tool defaults to are the run's config's (what its last command parsed).
    model = run_config(ckpt).get("model") or {}
    sampling = {k: v for k, v in model.items() if k in SAMPLING and isinstance(v, PLAIN)}
    return Loaded(net.eval(), tokenizer, {**hparams, **sampling})


def load_net(path: str | Path) -> Loaded:
    """The trained network of a checkpoint file or exported folder (in eval mode), its
    tokenizer and hyper-parameters."""
    return loaded(read_checkpoint(path), path)
