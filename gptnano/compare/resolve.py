"""What `gptnano fit` makes of each entry's command line, asked before any training: the
resolved configuration (fit's own parser, ``resolved_config``), the text it
trains on, and the network's size and FLOPs per token. Everything is asked in compare's own
process; Lightning is imported here only when the first entry is resolved, so that
`gptnano compare --help` starts without it. A mistake comes back as one line.
"""

import contextlib
import io
import logging
import os

from gptnano.errors import UserError


def resolve(requests: list[list[str]]) -> list[dict]:
    """The facts of each fit command line (``["--config", FILE, flags...]``): its resolved
    ``config``, ``text`` (path) and ``text_sha256``, ``n_tokens``, ``vocab_size``, the network's
    spec (``net``), ``params``, ``flops_per_token`` and ``block_size``; or ``{"error": one line}``
    for one the parser refuses or whose network cannot be built. The networks are built on
    PyTorch's meta device: their sizes and FLOPs without memory or time."""
    import torch

    from gptnano.checkpoint import build_net
    from gptnano.cli import quiet
    from gptnano.data.datamodule import ShakespeareDataModule

    quiet.hide_noise()
    answers, texts = [], {}
    for argv in requests:
        try:
            config = resolved_config(argv)
            data = ShakespeareDataModule(**config["data"])  # the text: the given one, or tiny Shakespeare
            key = (str(data.text_path), data.tokenizer_kind, config["data"].get("vocab"))
            if key not in texts:
                scan = data.corpus.scan(verbose=False)
                texts[key] = {"text": str(data.text_path), "text_sha256": scan.sha256, "n_tokens": scan.n_tokens,
                              "vocab_size": data.vocab_size}
            net = config["model"]["net"]
            spec = {"class_path": net["class_path"],
                    "init_args": {**(net.get("init_args") or {}), "vocab_size": texts[key]["vocab_size"]}}
            with torch.device("meta"):
                built = build_net(spec, source="the config")
            answers.append({"config": config, **texts[key], "net": spec, "params": built.num_params(),
                            "flops_per_token": built.flops_per_token(), "block_size": built.block_size})
        except UserError as e:
            answers.append({"error": str(e)})
    return answers


def parser_error(text: str) -> str:
    """jsonargparse's error (several indented lines after ``error:``) as one line."""
    found = text.split("error:", 1)
    body = found[1] if len(found) == 2 else (text.strip().splitlines() or ["the configuration did not parse"])[-1]
    return " ".join(body.split())[:400]


def resolved_config(argv: list[str]) -> dict:
    """The config ``gptnano fit ARGV`` would run, as plain data: a checkpoint's config as the base
    when ``--ckpt_path`` is given, the command line over it, the run's name, folders and text
    resolved, every setting fit refuses refused. Nothing is built and nothing trained; unlike fit,
    a folder that already holds a run is not refused. What fit prints on the way is not shown.

    Raises:
        UserError: one line, for any mistake fit would stop at before building the classes.
    """
    from gptnano.cli.lightning import GPTNanoCLI, Resolved  # Lightning: imported when a config is resolved

    out, err = io.StringIO(), io.StringIO()
    environ = dict(os.environ)  # seeding (LightningCLI._set_seed) writes PL_GLOBAL_SEED there
    logged = logging.root.manager.disable  # Lightning logs ("Seed set to ...") to the stream it found at import
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            GPTNanoCLI(args=["fit", *argv], resolve_only=True)
    except Resolved as done:
        return done.config
    except SystemExit:  # the parser printed its error (or a --help) and exited
        raise UserError(parser_error(err.getvalue())) from None
    finally:
        logging.disable(logged)
        os.environ.clear()
        os.environ.update(environ)
    raise RuntimeError("GPTNanoCLI(resolve_only=True) built its classes")  # before_instantiate_classes did not stop
