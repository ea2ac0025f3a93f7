"""Text <-> token ids, without Lightning: the data module, the LightningModule and
the tools that read checkpoints (`gptnano senses`, `gptnano generate`) share it.

A tokenizer is described by two plain values that travel in every checkpoint:
``kind`` ("char" or "byte") and ``vocab`` (a char tokenizer's characters as one
string; empty for bytes, whose 256 ids need no list).

Encoding is vectorised (numpy over code points or bytes, no Python loop per
character), so the same code encodes a prompt and a many-gigabyte corpus.
"""

import codecs

import numpy as np
import torch

from gptnano.errors import UserError

N_CODEPOINTS = 0x110000  # every Unicode code point is below this
BOM = "\ufeff"  # the byte-order mark some editors (Windows Notepad) put at the start of a UTF-8 file


def codepoints(text: str) -> np.ndarray:
    """The code points of ``text`` as a uint32 array (one element per character)."""
    # surrogatepass: a lone surrogate (e.g. from a badly encoded command line) becomes its
    # own code point, which the vocabulary then reports as unknown, instead of a crash here.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer:
    """Characters <-> integer ids. The vocabulary is a text's sorted set of characters (or
    a checkpoint's, in its own order: ``fit --init_from`` appends new characters to it),
    kept as one plain string so it travels in a checkpoint without pickle."""

    kind = "char"

    def __init__(self, vocab: str):
        if not vocab:
            raise UserError("the vocabulary is empty: the text has no characters")
        if len(set(vocab)) != len(vocab):
            raise UserError("the vocabulary has repeated characters")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}
        self._table: np.ndarray | None = None  # code point -> id (-1: unknown), built on first use

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.vocab)

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` that are not in the vocabulary, sorted."""
        return sorted(set(text) - self.stoi.keys())

    def encode_units(self, units: np.ndarray) -> np.ndarray:
        """Ids (int32, -1 for a character outside the vocabulary) of an array of code points.

        A lookup table over all of Unicode (4.4 MB) turns encoding into one gather."""
        if self._table is None:
            self._table = np.full(N_CODEPOINTS, -1, dtype=np.int32)
            self._table[codepoints(self.vocab)] = np.arange(len(self.vocab), dtype=np.int32)
        return self._table[units]

    def encode(self, text: str) -> torch.Tensor:
        ids = self.encode_units(codepoints(text))
        if (ids < 0).any():
            unknown = self.unknown(text)
            shown = ", ".join(repr(c) for c in unknown)
            hint = ""
            if "\n" in unknown:
                hint = (" (the model's text has no '\\n' line ends: its lines end with '\\r', as old Mac files do; write "
                        "the prompt that way or on one line)" if "\r" in self.stoi else
                        " (the model's text has no line breaks: write the prompt on one line)")
            raise UserError(f"characters not in the model's vocabulary: {shown}{hint}")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def stream_decoder(self):
        """A function ``feed(ids) -> str`` for streaming output: it returns the text of
        the ids fed so far that is complete (every character id is complete at once)."""
        return self.decode


class ByteTokenizer:
    """UTF-8 bytes <-> ids 0..255: any file can be trained on, whatever its characters
    (the way enwik8 results are reported, in bits per byte). A model may generate
    byte sequences that are not valid UTF-8; they decode to U+FFFD (replacement)."""

    kind = "byte"

    def __init__(self, vocab: str = ""):
        self.vocab = ""  # nothing to store: id i is byte i

    def __len__(self) -> int:
        return 256

    def unknown(self, text: str) -> list[str]:
        return []  # every text has a UTF-8 encoding

    def encode_units(self, units: np.ndarray) -> np.ndarray:
        """Ids of an array of byte values: the bytes themselves."""
        return units

    def encode(self, text: str) -> torch.Tensor:
        data = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        return torch.from_numpy(data.astype(np.int64))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", "replace")

    def stream_decoder(self):
        """A function ``feed(ids) -> str`` for streaming output. A character can span
        several bytes: an incomplete multi-byte sequence is held back until its last
        byte arrives (an invalid one comes out as U+FFFD)."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return lambda ids: decoder.decode(bytes(ids))


TOKENIZERS = {"char": CharTokenizer, "byte": ByteTokenizer}


def default_prompt(tokenizer) -> str:
    """The prompt when none is given (predict, generate, senses, the TensorBoard sample): a
    newline where the vocabulary has one, else its first character (a text saved as one long
    line, or with old Mac '\\r' line ends, has no '\\n')."""
    return "\n" if not tokenizer.unknown("\n") else tokenizer.vocab[0]


def as_prompt(text: str, tokenizer) -> str:
    """A prompt as editors save it, made to fit the model: a leading byte-order mark dropped, and
    Windows ('\\r\\n') and old Mac ('\\r') line ends made '\\n' when the model does not know '\\r'."""
    text = text.removeprefix(BOM)
    if tokenizer.unknown("\r"):
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def make_tokenizer(vocab: str | None, kind: str = "char"):
    """The tokenizer a checkpoint (or a data module) describes by ``kind`` and ``vocab``."""
    if kind not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {kind!r}: choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind](vocab or "")
