"""Look inside a Backpack (Hewitt et al. 2023, arXiv 2305.16765): what each sense
of a token predicts on its own.

A sense vector C(x)[l] reaches the output only through the tied head, so the
row ``C(x)[l] @ E^T`` (``Backpack.sense_logits``) lists the next characters that
sense pushes up whenever the model attends to it, and the ones it pushes down.
"""

import torch

from gptnano.models.base import LanguageModel


def show_char(c: str) -> str:
    """One character as a visible, whitespace-free table cell: space as '␣', newline as '\\n'."""
    if c == " ":
        return "␣"
    return c if c.isprintable() else repr(c)[1:-1]  # "\n" -> "\\n", "\x0b" -> "\\x0b"


def inspect_senses(model: LanguageModel, vocab: str, token: str, k: int = 5) -> str:
    """A printable table: for each sense of ``token``, its top-k and bottom-k next characters.

    Args:
        model: A Backpack (anything with ``sense_logits(token_id) -> [n_senses, vocab]``).
        vocab: The tokenizer's characters; ``vocab[i]`` is token id i.
        token: The character whose senses to show.
        k: How many characters to list at each end.

    Returns:
        Two header lines, then one line per sense: its number, the k characters
        with the highest logits (highest first), the k with the lowest (lowest first).
    """
    if not hasattr(model, "sense_logits"):
        raise TypeError(f"inspect_senses needs a Backpack model (one with sense_logits), got {type(model).__name__}")
    if len(vocab) != model.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} characters but the model has vocab_size {model.vocab_size}")
    if len(token) != 1 or token not in vocab:
        raise ValueError(f"token must be one character of the vocabulary, got {token!r}")
    if not 1 <= k <= len(vocab):
        raise ValueError(f"k must be between 1 and the vocabulary size {len(vocab)}, got {k}")

    was_training = model.training
    model.eval()  # no dropout: the table must not change from one call to the next
    try:
        with torch.no_grad():
            logits = model.sense_logits(vocab.index(token))  # (n_senses, vocab_size)
    finally:
        model.train(was_training)
    top = logits.topk(k, dim=-1).indices.tolist()
    bottom = logits.topk(k, dim=-1, largest=False).indices.tolist()

    width = max(len(show_char(c)) for c in vocab)
    cells = lambda ids: " ".join(show_char(vocab[i]).ljust(width) for i in ids)  # noqa: E731
    span = k * (width + 1) - 1
    lines = [
        f"senses of {show_char(token)!r}: next characters each sense pushes up (top) and down (bottom)",
        f"{'sense':>5}  {f'top {k}'.ljust(span)}  bottom {k}",
    ]
    lines += [f"{sense:>5}  {cells(top[sense])}  {cells(bottom[sense])}".rstrip() for sense in range(len(top))]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """`gptnano senses`: the sense table of a character, and optionally the same
    generation with and without one sense (scaled by --scale, 0 removes it)."""
    import argparse

    from gptnano.checkpoint import load_net
    from gptnano.errors import UserError
    from gptnano.sampling import generate

    ap = argparse.ArgumentParser(prog="gptnano senses", description=main.__doc__)
    ap.add_argument("--ckpt_path", required=True, help="a Backpack checkpoint, or a folder written by gptnano export")
    ap.add_argument("--token", required=True, help="the character whose senses to show")
    ap.add_argument("--k", type=int, default=5, help="characters listed at each end (default 5)")
    ap.add_argument("--sense", type=int, help="also generate with this sense scaled by --scale")
    ap.add_argument("--scale", type=float, default=0.0, help="scale of --sense (default 0: removed)")
    ap.add_argument("--prompt", help="prompt for the generation (default: a newline, or the vocabulary's first "
                    "character when the model's text has none)")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both generations")
    args = ap.parse_args(argv)

    net, tokenizer, _ = load_net(args.ckpt_path)
    # A byte model's tokens are the bytes 0..255: shown as the characters of those code points.
    vocab = tokenizer.vocab or "".join(map(chr, range(len(tokenizer))))
    if not hasattr(net, "sense_logits"):
        raise UserError(f"{args.ckpt_path} holds a {type(net).__name__}, not a Backpack: it has no senses")
    try:
        print(inspect_senses(net, vocab, args.token, args.k))
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.sense is None:
        return
    if not 0 <= args.sense < net.n_senses:
        raise UserError(f"--sense must be between 0 and {net.n_senses - 1}")
    from gptnano.data.tokenizer import as_prompt, default_prompt

    text = default_prompt(tokenizer) if args.prompt is None else as_prompt(args.prompt, tokenizer)
    prompt = tokenizer.encode(text)[None, :]

    def sample() -> str:
        g = torch.Generator().manual_seed(args.seed)
        out = generate(net, prompt, args.max_new_tokens, temperature=0.8, generator=g)
        return tokenizer.decode(out[0].tolist())

    print(f"\n--- all senses (seed {args.seed}) ---\n{sample()}")
    with net.scaled_sense(args.sense, args.scale):
        print(f"\n--- sense {args.sense} x {args.scale:g} (seed {args.seed}) ---\n{sample()}")
