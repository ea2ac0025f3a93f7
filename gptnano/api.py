"""gptnano from Python: train a model and look at what it learned, in a notebook or a script.

``fit`` trains through the same LightningCLI as ``gptnano fit`` (the same settings, defaults,
folders and checkpoints) and returns a ``Run``: the paths of its checkpoints and logs, its
network, its TensorBoard scalars and the views of ``gptnano inspect``. notebooks/tour.ipynb
uses nothing else. Mistakes are one-line ``UserError``s, raised (never an exit).

    from gptnano.api import fit
    run = fit(text="input.txt", settings={"model.net": "GPT", "trainer.max_steps": 200})
    run.scalars("val/loss")     # [(step, loss), ...]
    run.page(out="gpt.html")    # what the model does inside a passage

Lightning is imported by ``fit`` only, when it trains: importing this module costs what importing
torch does.
"""

import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gptnano.checkpoint import Loaded, load_net
from gptnano.data.tokenizer import as_prompt
from gptnano.errors import UserError
from gptnano.files import atomic_write
from gptnano.logs import read_run


@dataclass(frozen=True)
class Run:
    """A trained run: where its files are, and what can be read from them.

    ``Run.open(name, folder)`` finds a run trained earlier (by ``fit`` or by ``gptnano fit
    --trainer.default_root_dir FOLDER``); ``fit`` returns one.

    Attributes (the paths are absolute):
        name: The run's name (``--run_name``; by default the architecture's, e.g. ``"gpt"``).
        checkpoint: Its ``last.ckpt``: the weights at its last step (what a resume starts from).
        best: Its ``best.ckpt``: the weights of its lowest validation loss.
        logs: Its TensorBoard folder, ``lightning_logs/<name>`` (``version_N`` folders inside).
    """

    name: str
    checkpoint: Path
    best: Path
    logs: Path

    @classmethod
    def open(cls, name: str, folder: str | os.PathLike = "runs") -> "Run":
        """The run ``name`` trained under ``folder`` (``fit``'s ``folder``).

        Raises:
            UserError: ``folder`` holds no checkpoint of that name.
        """
        root = Path(folder).absolute()
        run = cls(name, root / "checkpoints" / name / "last.ckpt", root / "checkpoints" / name / "best.ckpt",
                  root / "lightning_logs" / name)
        if not (run.checkpoint.is_file() or run.best.is_file()):
            raise UserError(f"no run {name!r} under {root}: {run.checkpoint} does not exist")
        return run

    def load(self, which: str = "best") -> Loaded:
        """The trained network (in eval mode), its tokenizer and hyper-parameters.

        Args:
            which: ``"best"`` (the weights of the lowest validation loss; the last ones when the run
                never validated) or ``"last"``.

        Returns:
            ``(net, tokenizer, hparams)``, as ``gptnano.checkpoint.load_net`` reads them: ``net`` is
            the ``nn.Module`` (``forward(idx[B, T]) -> logits[B, T, vocab]``), ``tokenizer`` has
            ``encode(str) -> LongTensor[T]`` and ``decode(list[int]) -> str``.

        Raises:
            UserError: ``which`` is neither, or the checkpoint cannot be read.
        """
        if which not in ("best", "last"):
            raise UserError(f"which must be 'best' or 'last', got {which!r}")
        path = self.best if which == "best" and self.best.is_file() else self.checkpoint
        return load_net(path)

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        """One TensorBoard curve of the run, in step order (a resumed run's versions joined).

        Args:
            tag: A scalar's tag: ``"val/loss"`` (nats per token), ``"val/bpc"``, ``"train/loss"``,
                ``"perf/tok_s"``, ... (docs/tensorboard.md lists them).

        Returns:
            ``[(step, value), ...]``; ``step`` counts optimizer updates.

        Raises:
            UserError: the run has no logs, or none with this tag (the message lists those it has).
        """
        if not self.logs.is_dir():
            raise UserError(f"no TensorBoard logs at {self.logs} (the run was trained with --trainer.logger false?)")
        series = read_run(self.logs)["series"]
        if tag not in series:
            raise UserError(f"no scalar {tag!r} in {self.logs}: it has {', '.join(sorted(series))}")
        return [(step, value) for _, step, value in series[tag]]

    def look_inside(self, text: str | None = None, *, max_chars: int | None = None) -> dict:
        """Every view of ``gptnano inspect``, as numbers: ``gptnano.views.look_inside`` of the best weights.

        Args:
            text: The passage: at least 2 and at most ``block_size`` characters (``max_chars`` for an
                RNN or a CNN). None: a few built-in lines cut to the context, or the model's own
                greedy continuation of a newline when its vocabulary lacks their characters.
            max_chars: Let an RNN or a CNN read a passage longer than its context.

        Returns:
            The dict that docs/inspect.md describes key by key (``surprisal`` in nats, ``attention``,
            ``rnn``, ``backpack``, ``cnn``, ...).

        Raises:
            UserError: characters outside the vocabulary, or a passage too short or too long.
        """
        from gptnano.views import default_passage, look_inside

        path = self.best if self.best.is_file() else self.checkpoint
        net, tokenizer, _ = load_net(path)
        text = default_passage(net, tokenizer, max_chars) if text is None else as_prompt(text, tokenizer)
        return look_inside(net, tokenizer, text, max_chars=max_chars, source=str(path))

    def page(self, text: str | None = None, out: str | os.PathLike | None = None, *,
             max_chars: int | None = None) -> Path:
        """Write the page of ``gptnano inspect`` for a passage: one self-contained HTML file.

        Args:
            text: The passage, as for ``look_inside``.
            out: The file to write; by default ``inspect-<name>.html`` in the current folder.
            max_chars: As for ``look_inside``.

        Returns:
            The path written. Its text is a whole HTML document that loads nothing from the network
            (in a notebook, show it in an ``<iframe srcdoc=...>``).

        Raises:
            UserError: as ``look_inside``; WriteError (a UserError) when ``out`` cannot be written.
        """
        from gptnano.views import page

        out = Path(out or f"inspect-{self.name}.html")
        return atomic_write(out, page(self.look_inside(text, max_chars=max_chars)))


def fit(config: str | os.PathLike | None = None, *, text: str | os.PathLike | None = None,
        folder: str | os.PathLike = "runs", run_name: str | None = None,
        settings: Mapping[str, object] | None = None, verbose: bool = False) -> Run:
    """Train a model as ``gptnano fit`` does, in this process, and return the run.

    The command it runs is ``gptnano fit --config CONFIG --data.path TEXT --trainer.default_root_dir
    FOLDER --run_name RUN_NAME --KEY VALUE ...`` (one ``--KEY VALUE`` per setting, in order): every
    default, check and one-line error of the command line holds, and the run's files are those
    the command would write, under ``folder``.

    Args:
        config: A YAML file of settings (``configs/gpt.yaml``), or None for the command line's
            defaults (a GPT of ``gptnano fit --help``'s sizes).
        text: A UTF-8 text file to train on: its first 90 % trains, the last 10 % validates. None:
            ``GPTNANO_DATA``, else tiny Shakespeare, downloaded once into ``data/`` (needs internet).
        folder: Where the run's files go: ``checkpoints/<run_name>/`` and ``lightning_logs/<run_name>/``
            under it. A second run of the same name in the same folder is refused: give another
            ``run_name``, or resume it with ``settings={"ckpt_path": "last"}``.
        run_name: The run's name; default: the config's, else the architecture's (``"gpt"``).
        settings: Flags of ``gptnano fit`` by their dotted names without the dashes, e.g.
            ``{"model.net": "RNN", "model.net.n_layer": 2, "trainer.max_steps": 200}`` (``gptnano fit
            --help`` lists them). Values are written as the command line reads them: True/False as
            ``true``/``false``, None as ``null``, lists and dicts as JSON.
        verbose: Show every message and warning Lightning prints (``gptnano --verbose``).

    Returns:
        The ``Run``: its paths, network, scalars and views.

    Raises:
        UserError: a setting the command line refuses (an unknown flag, a wrong type, an impossible
            size), a missing text, a run folder already in use, a file that cannot be written.
        KeyboardInterrupt: training was interrupted (the kernel's stop button, Ctrl-C); it saved
            ``last.ckpt`` first, from which ``settings={"ckpt_path": "last"}`` and the same
            ``run_name`` resume it.
    """
    from gptnano import devices
    from gptnano.cli.lightning import run as run_command  # Lightning: imported when a model trains

    argv = ["fit"]
    if config is not None:
        argv += ["--config", str(config)]
    if text is not None:
        argv += ["--data.path", str(text)]
    argv += ["--trainer.default_root_dir", str(folder)]
    if run_name is not None:
        argv += ["--run_name", run_name]
    for key, value in (settings or {}).items():
        argv += [f"--{key.removeprefix('--')}", command_line_value(value)]
    with kept_environment(devices.DEVICE_ENV):  # each model's device is chosen for it, not the first one's
        cli = run_command(argv, verbose=verbose, exits=False)
    cfg = cli.config["fit"]
    board = next((lg for lg in cli.trainer.loggers if type(lg).__name__ == "Board"), None)
    checkpoints = Path(cfg.checkpoint.dirpath).absolute()  # absolute: the Run outlives a change of folder
    logs = Path(board.save_dir) / board.name if board else Path(folder) / "lightning_logs" / cfg.run_name
    logs = logs.absolute()
    return Run(cfg.run_name, checkpoints / "last.ckpt", checkpoints / "best.ckpt", logs)


def command_line_value(value: object) -> str:
    """A Python value as ``gptnano fit`` reads it on its command line (YAML: JSON is YAML)."""
    if isinstance(value, (bool, type(None), list, tuple, dict)):
        return json.dumps(value)
    return str(value)


@contextmanager
def kept_environment(*names: str):
    """Put environment variables back as they were: the CLI passes verdicts to its DDP processes
    through them, which in one long-lived process would carry over to the next run."""
    was = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in was.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def shakespeare(folder: str | os.PathLike = "data") -> Path:
    """Tiny Shakespeare (1,115,394 characters), downloaded once into ``folder/tinyshakespeare/input.txt``
    (where ``gptnano fit`` keeps it when ``folder`` is ``"data"``) and checked against its sha256.

    Returns:
        The file's path.

    Raises:
        UserError: no internet, or a download that was cut short or does not match the checksum.
    """
    from gptnano.data.datamodule import SHAKESPEARE_SHA256, SHAKESPEARE_URL
    from gptnano.data.text import download

    path = Path(folder) / "tinyshakespeare" / "input.txt"
    return path if path.is_file() else download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
