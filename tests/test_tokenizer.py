"""Tokenizers: characters and bytes, what a checkpoint stores of them, streaming decode."""

import pytest
import torch

from gptnano.data.tokenizer import TOKENIZERS, ByteTokenizer, CharTokenizer, make_tokenizer
from gptnano.errors import UserError

TEXT = "Ça va? Grüße, 日本語 and a clef 𝄞.\n"


def test_char_encoding_is_the_dict_lookup():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.encode(TEXT).tolist() == [tok.stoi[c] for c in TEXT]
    assert tok.decode(tok.encode(TEXT).tolist()) == TEXT
    assert tok.encode("").shape == (0,)


def test_char_encoding_names_unknown_characters_even_lone_surrogates():
    tok = CharTokenizer("abc")
    with pytest.raises(UserError, match=r"'\\udcff'"):
        tok.encode("ab\udcff")  # what a non-UTF-8 command line argument becomes


def test_byte_round_trip_with_non_ascii_text():
    tok = make_tokenizer("", "byte")
    assert isinstance(tok, ByteTokenizer) and TOKENIZERS["byte"] is ByteTokenizer
    assert len(tok) == 256 and tok.kind == "byte" and tok.vocab == "" and tok.unknown(TEXT) == []
    ids = tok.encode(TEXT)
    assert ids.dtype == torch.long and ids.tolist() == list(TEXT.encode("utf-8"))
    assert len(ids) > len(TEXT)  # several bytes for ç, ü, ß, 日, 𝄞
    assert tok.decode(ids.tolist()) == TEXT


def test_byte_decode_replaces_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 0xFF, 0xE6, 0x97]) == "hi\ufffd\ufffd"  # a stray byte, a cut-off character


def test_byte_stream_decoder_holds_back_an_unfinished_character():
    feed = ByteTokenizer().stream_decoder()
    ids = list("a日𝄞".encode("utf-8"))  # 1 + 3 + 4 bytes
    pieces = [feed([i]) for i in ids]
    assert pieces == ["a", "", "", "日", "", "", "", "𝄞"]
    assert feed([0xFF]) == "\ufffd"  # an invalid byte comes out as a replacement, not an error


def test_char_stream_decoder_is_immediate():
    tok = CharTokenizer("ab\n")
    feed = tok.stream_decoder()
    assert [feed([i]) for i in (0, 1, 2)] == ["a", "b", "\n"]


def test_unknown_kind_is_one_line():
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'"):
        make_tokenizer("abc", "bpe")
