"""`gptnano inspect`: one self-contained HTML page that shows what a trained model does inside
one passage: how surprised it was by each character and what it expected instead, and its own
views (the GPT's attention maps, the RNN's hidden units and the units that track simple
features, the senses that carry a Backpack's prediction, a CNN's receptive field and what moved
its prediction). The page loads nothing from the network and opens in any browser, offline.

    gptnano inspect --ckpt_path checkpoints/gpt/best.ckpt
    gptnano inspect --ckpt_path checkpoints/rnn/best.ckpt --text_file scene.txt --max_chars 400

The numbers come from gptnano.views (``look_inside``); how to read them: docs/inspect.md.
Lightning is never imported.
"""

import argparse
import sys
from pathlib import Path

# torch is imported inside main, so that --help and mistyped options answer at once.


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptnano inspect", description=__doc__.split("\n\n    ")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_path", required=True,
                    help="a checkpoint written by gptnano fit, or a folder written by gptnano export")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--text", help="the passage to look at (default: a few built-in lines in the style of "
                        "tiny Shakespeare, cut to the model's context; for a model whose vocabulary lacks their "
                        "characters, its own greedy continuation of a newline)")
    source.add_argument("--text_file", help="a UTF-8 file whose whole content is the passage (Windows line ends "
                        "become newlines when the model knows no \\r)")
    ap.add_argument("--out", help="the HTML file to write (default: inspect-<run>.html in this folder)")
    ap.add_argument("--max_chars", type=int, help="the longest passage (default: the model's context, block_size). "
                    "Only an RNN or a CNN reads more at once: each CNN position still sees only its receptive field")
    return ap


def read_passage(args, net, tokenizer) -> str:
    """The passage given (as ``as_prompt`` fits a prompt to the model), or the default one."""
    from gptnano.data.tokenizer import as_prompt
    from gptnano.views import default_passage

    if args.text_file is not None:
        from gptnano.data.text import read_text  # the data module's own reader: the same one-line errors

        return as_prompt(read_text(Path(args.text_file), "text file"), tokenizer)
    if args.text is not None:
        return as_prompt(args.text, tokenizer)
    return default_passage(net, tokenizer, args.max_chars)


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)  # before torch is imported

    from gptnano.checkpoint import loaded, read_checkpoint, run_name
    from gptnano.files import atomic_write, shown_path
    from gptnano.lines import line
    from gptnano.views import look_inside, page

    ckpt = read_checkpoint(args.ckpt_path)
    net, tokenizer, _ = loaded(ckpt, args.ckpt_path)
    data = look_inside(net, tokenizer, read_passage(args, net, tokenizer), max_chars=args.max_chars,
                       source=str(args.ckpt_path))
    out = Path(args.out or f"inspect-{run_name(args.ckpt_path, ckpt)}.html")
    atomic_write(out, page(data))  # a WriteError (one line) when --out cannot be written
    unit = "characters" if tokenizer.kind == "char" else "tokens"
    print(line(f"wrote {shown_path(out)}", f"{data['model']['architecture']} on {len(data['ids'])} {unit}",
               f"mean loss {data['mean_loss']:.4f} nats per {unit[:-1]}"), file=sys.stdout)
