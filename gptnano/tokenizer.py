"""Text <-> token ids, without Lightning: the data module, the LightningModule and
the tools that read checkpoints (`gptnano senses`, `gptnano generate`) share it.

A tokenizer is described by two plain values that travel in every checkpoint:
``kind`` ("char") and ``vocab`` (its characters as one string).
"""

import torch

from gptnano.errors import UserError


class CharTokenizer:
    """Characters <-> integer ids. The vocabulary is the sorted set of characters,
    kept as one plain string so it travels in a checkpoint without pickle."""

    kind = "char"

    def __init__(self, vocab: str):
        if not vocab:
            raise UserError("the vocabulary is empty: the text has no characters")
        if len(set(vocab)) != len(vocab):
            raise UserError("the vocabulary has repeated characters")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.vocab)

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` that are not in the vocabulary, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> torch.Tensor:
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(repr(c) for c in missing)
            raise UserError(f"characters not in the model's vocabulary: {shown}")
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def stream_decoder(self):
        """A function ``feed(ids) -> str`` for streaming output: it returns the text of
        the ids fed so far that is complete (every character id is complete at once)."""
        return self.decode


TOKENIZERS = {"char": CharTokenizer}


def make_tokenizer(vocab: str | None, kind: str = "char"):
    """The tokenizer a checkpoint (or a data module) describes by ``kind`` and ``vocab``."""
    if kind not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {kind!r}: choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind](vocab or "")
