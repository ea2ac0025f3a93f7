"""The prepared corpus: token ids written once, reused, rebuilt when stale or broken,
in the smallest dtype, one builder at a time, and the byte tokenizer end to end."""

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

import gptnano.data.cache as corpus
import gptnano.data.text as text_module
from gptnano.checkpoint import load_net
from gptnano.data.cache import Corpus, dtype_for
from gptnano.data.tokenizer import ByteTokenizer, CharTokenizer
from gptnano.errors import UserError
from tests.helpers import TINY_GPT, make_text, run_cli


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cache goes to ./data/prepared


@pytest.fixture
def trusted_stat(monkeypatch):
    """Remember scans of files written just now (in real use a file must have been quiet
    for 2 s, because a second write within one timestamp tick would go unnoticed)."""
    monkeypatch.setattr(corpus, "RACY_NS", -10**18)


def prepare(path, kind="char", vocab=None):
    tokenizer = CharTokenizer(vocab) if vocab else None
    c = Corpus(path, kind)
    if tokenizer is None:
        tokenizer = CharTokenizer(c.scan().units) if kind == "char" else ByteTokenizer()
    return c.prepare(tokenizer)


def expected_ids(text: str) -> np.ndarray:
    """Today's in-memory encoding: a dict lookup per character."""
    tok = CharTokenizer.from_text(text)
    return np.array([tok.stoi[c] for c in text])


def bin_files(root):
    return sorted(p.name for p in (root / "data" / "prepared").glob("*.bin"))


def test_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert [dtype_for(n) for n in (2, 256, 257, 65536, 65537, 1_114_112)] == [
        np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint32]


@pytest.mark.parametrize("n_distinct,dtype", [(65, np.uint8), (300, np.uint16), (70_000, np.uint32)])
def test_ids_are_stored_in_the_smallest_dtype_and_equal_the_dict_encoding(tmp_path, n_distinct, dtype):
    # Code points from U+0020 up, skipping the surrogates (not characters), each used twice.
    chars = [chr(c) for c in range(0x20, 0x20 + n_distinct + 2048) if not 0xD800 <= c <= 0xDFFF][:n_distinct]
    text = "".join(chars) + "".join(reversed(chars)) + "\n"
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    prepared = prepare(path)
    assert prepared.ids.dtype == dtype and prepared.meta["dtype"] == np.dtype(dtype).name
    assert len(prepared.meta["vocab"]) == n_distinct + 1
    assert np.array_equal(prepared.ids, expected_ids(text))


def test_a_character_split_between_two_chunks_is_decoded_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 7)  # cuts through most multi-byte characters
    text = "héllo wörld, ça va? 𝄞 ✓\n" * 5
    path = tmp_path / "utf8.txt"
    path.write_text(text, encoding="utf-8")
    assert np.array_equal(prepare(path).ids, expected_ids(text))


def test_prepared_once_then_reused_without_reading_the_text(tmp_path, text_file, trusted_stat, monkeypatch, capsys):
    first = prepare(text_file)
    assert first.built and bin_files(tmp_path) == [first.path.name]

    def no_reading(*args):
        raise AssertionError("the text was read again")
    monkeypatch.setattr(corpus, "read_units", no_reading)
    second = prepare(text_file)  # a new Corpus, as in a new process
    assert not second.built and second.path == first.path
    assert np.array_equal(second.ids, first.ids) and isinstance(second.ids, corpus.Tokens)


def test_a_freshly_written_text_is_scanned_again_but_not_tokenised_again(text_file, monkeypatch):
    prepare(text_file)  # the file was written < 2 s ago: its scan is not trusted next time

    def no_building(*args):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(Corpus, "_build", no_building)
    assert not prepare(text_file).built


def test_rebuilt_when_the_text_changes(tmp_path, text_file, trusted_stat):
    old = prepare(text_file)
    text = text_file.read_text() + "A new line with new characters: XYZ!\n"
    text_file.write_text(text)
    new = prepare(text_file)
    assert new.built and new.path != old.path
    assert np.array_equal(new.ids, expected_ids(text))
    assert "X" in new.meta["vocab"]


def test_rebuilt_when_the_text_changes_in_place_with_the_same_size(tmp_path, text_file, trusted_stat):
    prepare(text_file)
    time.sleep(0.05)  # a later timestamp tick
    text = text_file.read_text().replace("king", "KING")
    text_file.write_text(text)
    assert np.array_equal(prepare(text_file).ids, expected_ids(text))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "garble metadata", "delete metadata", "other text's metadata"])
def test_a_broken_cache_is_rebuilt_never_used(tmp_path, text_file, trusted_stat, damage):
    good = prepare(text_file)
    bin_path, meta_path = good.path, good.path.with_suffix(".json")
    ids = np.array(good.ids)
    del good
    if damage == "truncate":
        bin_path.write_bytes(bin_path.read_bytes()[:-10])
    elif damage == "flip a byte":
        raw = bytearray(bin_path.read_bytes())
        raw[len(raw) // 2] ^= 1
        bin_path.write_bytes(bytes(raw))
    elif damage == "garble metadata":
        meta_path.write_text("{not json")
    elif damage == "delete metadata":
        meta_path.unlink()
    else:
        meta = json.loads(meta_path.read_text())
        meta["sha256"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
    again = prepare(text_file)
    assert again.built
    assert np.array_equal(again.ids, ids)


def test_the_ids_checksum_is_checked_again_only_after_a_write(text_file, trusted_stat, monkeypatch):
    path = prepare(text_file).path
    prepare(text_file)  # the first reuse checks the CRC-32 and records the file's stat
    checked = []
    crc32 = corpus.file_crc32
    monkeypatch.setattr(corpus, "file_crc32", lambda p: checked.append(p) or crc32(p))
    assert not prepare(text_file).built and checked == []  # stat unchanged: no need to read 1 GB again
    os.utime(path)  # any write moves the change time
    assert not prepare(text_file).built and checked == [path]  # read again, still intact: reused


def test_a_checkpoint_vocabulary_gets_its_own_ids(tmp_path, text_file):
    own = prepare(text_file)
    wider = "".join(sorted(set(own.meta["vocab"]) | set("0123456789")))
    other = prepare(text_file, vocab=wider)
    assert other.path != own.path
    tok = CharTokenizer(wider)
    assert np.array_equal(other.ids, tok.encode(text_file.read_text()).numpy())
    same = prepare(text_file, vocab=own.meta["vocab"])  # the text's own vocabulary: the same file
    assert same.path == own.path and not same.built


def test_checks_refuse_before_anything_is_written(tmp_path, text_file):
    with pytest.raises(UserError, match="not in the model's vocabulary"):
        prepare(text_file, vocab="abc")
    def too_short(n_tokens):
        raise UserError("too short")
    c = Corpus(text_file, "char")
    with pytest.raises(UserError, match="too short"):
        c.prepare(CharTokenizer(c.scan().units), check=too_short)
    (tmp_path / "a.txt").write_text("a" * 500)
    with pytest.raises(UserError, match=r"one character repeated \('a' x 500\)"):
        prepare(tmp_path / "a.txt")
    assert not (tmp_path / "data").exists()


def test_not_utf8_names_the_byte_offset_even_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 4)
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo".encode() + b"\xe2\x82" + b"x")  # a 3-byte character cut short
    with pytest.raises(UserError, match=r"not valid UTF-8 \(byte offset 6: b'\\xe2'\).*--data.tokenizer byte"):
        prepare(path)
    path.write_bytes("héllo".encode() + b"\xe2\x82")  # cut short by the end of the file
    with pytest.raises(UserError, match=r"byte offset 6"):
        prepare(path)


def test_concurrent_processes_build_once(tmp_path, text_file, monkeypatch):
    """Ranks started together (torchrun): one builds under the lock, the other waits and maps it."""
    slow_build = Corpus._build

    def build(self, *args):
        time.sleep(0.5)  # keep the lock long enough for the other to arrive
        return slow_build(self, *args)
    monkeypatch.setattr(Corpus, "_build", build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare(text_file))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, True]
    assert np.array_equal(results[0].ids, results[1].ids)
    assert len(bin_files(tmp_path)) == 1
    assert not [p for p in (tmp_path / "data" / "prepared").iterdir() if p.name.endswith(".tmp")]


def test_byte_corpus_is_the_file_itself(tmp_path):
    raw = bytes(range(256)) * 3 + b"\xff\xfe not UTF-8 at all"
    path = tmp_path / "binary.dat"
    path.write_bytes(raw)
    prepared = prepare(path, kind="byte")
    assert prepared.ids.dtype == np.uint8 and np.asarray(prepared.ids).tobytes() == raw
    assert prepared.meta["vocab"] == "" and prepared.meta["kind"] == "byte"


def test_byte_tokenizer_through_the_cli_and_back_from_its_checkpoint(tmp_path):
    """fit on bytes, then validate and predict from the checkpoint alone: the kind
    travels in it and decodes non-ASCII text."""
    text = tmp_path / "intl.txt"
    text.write_text(make_text(6000).replace("o", "ö").replace("e", "é") + "日本語のテキスト\n" * 50, encoding="utf-8")
    fit = run_cli(["fit", *TINY_GPT, "--data.path", str(text), "--data.tokenizer", "byte",
                   "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"], tmp_path)
    assert "tokenized" in fit.stderr
    ckpt = tmp_path / "checkpoints" / "gpt" / "last.ckpt"
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["tokenizer"] == "byte" and hparams["net"]["init_args"]["vocab_size"] == 256
    assert load_net(ckpt).tokenizer.kind == "byte"

    val = run_cli(["validate", "--ckpt_path", str(ckpt), "--data.path", str(text), "--trainer.enable_progress_bar", "false"], tmp_path)
    assert "reusing" in val.stderr and "tokenized" not in val.stderr
    assert len(bin_files(tmp_path)) == 1

    out = run_cli(["predict", "--ckpt_path", str(ckpt), "--data.prompt", "Röméo 日本:", "--model.max_new_tokens", "30",
                   "--model.sample_seed", "0"], tmp_path)
    assert out.stdout.startswith("Röméo 日本:")
