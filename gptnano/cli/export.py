"""`gptnano export`: hand a trained model to someone without gptnano.

    gptnano export --ckpt_path checkpoints/gpt/best.ckpt --out exported/gpt
    gptnano export --ckpt_path checkpoints/gpt/best.ckpt --out exported/gpt-hf --format hf
    gptnano export --ckpt_path checkpoints/rnn/best.ckpt --out exported/rnn-onnx --format onnx

Formats (docs/export.md says how to load each):
  safetensors  the weights (no optimizer state) and a config.json of plain settings; every
               gptnano command that takes --ckpt_path takes this folder too, and
               `gptnano fit --init_from` starts a new run from it. All four architectures.
  hf           a GPT-2 for Hugging Face transformers (AutoModelForCausalLM and
               AutoTokenizer, no remote code). The GPT only, with its newer
               options (rope, qk_norm, ...) off: GPT-2 has none of them.
  onnx         model.onnx (logits of every position, batch and length dynamic) and the
               tokenizer files, for onnxruntime. All four architectures.
"""

import argparse
import sys
import time
from pathlib import Path

from gptnano.errors import UserError

# What each format writes: a folder may be written again in the format it holds, never mixed with another.
FILES = {
    "safetensors": {"model.safetensors", "config.json"},
    "hf": {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"},
    "onnx": {"model.onnx", "tokenizer.json", "tokenizer_config.json"},
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptnano export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_path", required=True,
                    help="a checkpoint written by gptnano fit (best.ckpt, last.ckpt), or a folder of --format safetensors")
    ap.add_argument("--out", required=True, help="the folder to write (created if needed; it may hold an earlier "
                    "export of the same format, whose files are replaced, and nothing else)")
    ap.add_argument("--format", choices=list(FILES), default="safetensors",
                    help="safetensors (default), hf (transformers, GPT only) or onnx")
    return ap


def held_format(out: Path) -> str | None:
    """The export format a folder's config.json belongs to, if it has one."""
    import json

    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(config, dict):
        return "safetensors" if config.get("format") == "gptnano" else "hf" if "model_type" in config else None
    return None


def check_out(out: Path, fmt: str, source: Path) -> None:
    """Refuse a --out that would mix exports or overwrite what is not an export of this format."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the folder being read: give another one")
    present = {p.name for p in out.iterdir() if not p.name.startswith(".")} if out.is_dir() else set()
    other = sorted(present - FILES[fmt])
    if other or ("config.json" in present and held_format(out) != fmt):
        shown = ", ".join(other[:3]) or "config.json of another format"
        raise UserError(f"--out {out} already holds other files ({shown}): give a new or empty folder, "
                        f"or one holding an earlier --format {fmt} export")


def size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes >= 100_000 else f"{n_bytes / 1e3:.1f} kB"


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)  # before torch is imported: --help and typos answer at once
    from gptnano.checkpoint import loaded, read_checkpoint, run_name

    out, source = Path(args.out), Path(args.ckpt_path)
    check_out(out, args.format, source)
    ckpt = read_checkpoint(source)
    net, tokenizer, hparams = loaded(ckpt, source)
    init_args = hparams["net"]["init_args"]
    started = time.perf_counter()
    if args.format == "safetensors":
        from gptnano.export.folder import write_safetensors

        step = ckpt.get("global_step", ckpt.get("exported_from", {}).get("global_step"))
        exported_from = {"checkpoint": str(source), "run_name": run_name(source, ckpt),
                         "global_step": step if isinstance(step, int) else None}
        written = write_safetensors(net, init_args, tokenizer, hparams, out, exported_from)
    elif args.format == "hf":
        from gptnano.export.hf import write_hf

        written = write_hf(net, init_args, tokenizer, out)
    else:
        from gptnano.export.onnx import write_onnx

        written = write_onnx(net, tokenizer, out)
    seconds = time.perf_counter() - started
    files = ", ".join(f"{p.name} {size(p.stat().st_size)}" for p in written)
    print(f"gptnano: exported {type(net).__name__} ({net.num_params():,} parameters, {len(tokenizer)} tokens) "
          f"from {source} to {out} as {args.format} in {seconds:.1f} s: {files}", file=sys.stderr)
