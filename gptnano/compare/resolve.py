"""What `gptnano fit` makes of each entry's command line, asked before any training: the
resolved configuration (fit's own, ``gptnano.cli.lightning.resolved_config``), the text it
trains on, and the network's size and FLOPs per token. Everything is asked in compare's own
process; Lightning is imported here only when the first entry is resolved, so that
`gptnano compare --help` starts without it. A mistake comes back as one line.
"""

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
    from gptnano.cli.lightning import resolved_config
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
