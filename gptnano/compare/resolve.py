"""What `gptnano fit` makes of a command line, asked before any training: the resolved
configuration (fit's own parser, ``--print_config``), the text it trains on, and the network's
size and FLOPs per token. `gptnano compare` asks for every entry at once, in one child
process, so that its own process never imports Lightning; a mistake comes back as one line.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gptnano.errors import UserError
from gptnano.files import atomic_write

# What the child answers for each command line (besides "error"), all plain data.
FACTS = ("config", "text", "text_sha256", "n_tokens", "vocab_size", "net", "params", "flops_per_token", "block_size")


def resolve(requests: list[list[str]], env: dict) -> list[dict]:
    """The facts of each fit command line (``["--config", FILE, flags...]``), or
    ``{"error": one line}`` for one the parser refuses or whose network cannot be built."""
    with tempfile.TemporaryDirectory(prefix="gptnano-resolve-") as tmp:
        ask, answer = Path(tmp, "requests.json"), Path(tmp, "answers.json")
        ask.write_text(json.dumps(requests), encoding="utf-8")
        code = "from gptnano.compare.resolve import child; child()"
        proc = subprocess.run([sys.executable, "-c", code, str(ask), str(answer)], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0 or not answer.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not check the configs (exit {proc.returncode}): {last}")
        return json.loads(answer.read_text(encoding="utf-8"))


def parser_error(text: str) -> str:
    """jsonargparse's error (several indented lines after ``error:``) as one line."""
    found = text.split("error:", 1)
    body = found[1] if len(found) == 2 else (text.strip().splitlines() or ["the configuration did not parse"])[-1]
    return " ".join(body.split())[:400]


def child() -> None:
    """The child process of ``resolve``: argv = [requests.json, answers.json]. The network is
    built on PyTorch's meta device: its sizes and FLOPs without memory or time."""
    import contextlib
    import io

    import torch
    import yaml

    from gptnano.checkpoint import build_net
    from gptnano.cli import quiet
    from gptnano.cli.lightning import GPTNanoCLI
    from gptnano.data.datamodule import ShakespeareDataModule

    quiet.hide_noise()
    requests = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    answers, texts = [], {}
    for argv in requests:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    GPTNanoCLI(args=[*argv, "--print_config"], run=False)  # fit's parser: it prints, then exits
                except SystemExit as e:
                    if e.code not in (0, None):
                        raise UserError(parser_error(err.getvalue())) from None
                config = yaml.safe_load(out.getvalue())
                data = ShakespeareDataModule(**config["data"])  # the text: the given one, or tiny Shakespeare
                key = (str(data.text_path), data.tokenizer_kind, config["data"].get("vocab"))
                if key not in texts:
                    scan = data.corpus.scan(verbose=False)
                    texts[key] = {"text": str(data.text_path), "text_sha256": scan.sha256,
                                  "n_tokens": scan.n_tokens, "vocab_size": data.vocab_size}
                net = config["model"]["net"]
                spec = {"class_path": net["class_path"],
                        "init_args": {**(net.get("init_args") or {}), "vocab_size": texts[key]["vocab_size"]}}
                with torch.device("meta"):
                    built = build_net(spec, source="the config")
            answers.append({"config": config, **texts[key], "net": spec, "params": built.num_params(),
                            "flops_per_token": built.flops_per_token(), "block_size": built.block_size})
        except UserError as e:
            answers.append({"error": str(e)})
    atomic_write(sys.argv[2], json.dumps(answers))


# ----- when the answers can be reused ------------------------------------------------------
def file_stat(path: str | Path) -> list[int] | None:
    """Size and modification time of a file (None: it is gone): any write changes them."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def key(requests: list[list[str]], env: dict) -> str:
    """What the answers follow from: the command lines, the content of the config files they
    name, the working folder and GPTNANO_DATA, and the code that parses them (gptnano's files,
    Lightning's and jsonargparse's versions). The text is checked apart (``file_stat``)."""
    from importlib.metadata import PackageNotFoundError, version

    files = {}
    for argv in requests:
        for i, a in enumerate(argv):
            name = argv[i + 1] if a in ("--config", "-c") and i + 1 < len(argv) else (
                a.split("=", 1)[1] if a.startswith("--config=") else None)
            if name and Path(name).is_file():
                files[name] = hashlib.sha256(Path(name).read_bytes()).hexdigest()
    package = Path(__file__).resolve().parents[1]
    code = sorted([str(p.relative_to(package)), file_stat(p)] for p in package.rglob("*.py"))
    versions = []
    for dist in ("lightning", "jsonargparse"):
        try:
            versions.append(version(dist))
        except PackageNotFoundError:
            versions.append(None)
    blob = json.dumps([requests, files, os.getcwd(), env.get("GPTNANO_DATA"), code, versions])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
