"""Texts and prompt files as Windows, macOS and Linux editors save them (issue 19, item 8): they
work, or get one line saying exactly what to change. The same rules for predict, generate, senses
and the TensorBoard sample (gptnano/data/tokenizer.py: ``default_prompt``, ``as_prompt``)."""

import codecs

import pytest

from gptnano.data.cache import Corpus
from gptnano.data.tokenizer import CharTokenizer, as_prompt, default_prompt, make_tokenizer
from gptnano.errors import UserError
from tests.helpers import TINY_GPT, fit_in_process, make_text


@pytest.fixture(scope="module")
def old_mac_run(tmp_path_factory):
    """A tiny GPT trained on a text with old Mac line ends: '\\r', no '\\n' anywhere."""
    folder = fit_in_process(tmp_path_factory.mktemp("oldmac"), make_text().replace("\n", "\r").encode("utf-8"),
                            [*TINY_GPT, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"], name="mac.txt")
    return folder / "checkpoints" / "gpt" / "last.ckpt"


def test_a_model_without_newlines_samples_from_its_default_prompt(old_mac_run, gptnano, tmp_path):
    """Before: predict and generate without a prompt failed with `characters not in the model's vocabulary: '\\n'`."""
    first = CharTokenizer.from_text(make_text().replace("\n", "\r")).vocab[0]
    for args in (["predict", "--ckpt_path", str(old_mac_run), "--model.max_new_tokens", "5"],
                 ["generate", "--ckpt_path", str(old_mac_run), "--max_new_tokens", "5", "--seed", "1"]):
        ran = gptnano(args, tmp_path)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert ran.stdout.startswith(first) and len(ran.stdout.rstrip("\n")) == 6, repr(ran.stdout)


def test_a_linux_prompt_for_an_old_mac_model_says_what_to_change(old_mac_run, gptnano, tmp_path):
    ran = gptnano(["generate", "--ckpt_path", str(old_mac_run), "--prompt", "ROMEO:\nJULIET", "--max_new_tokens", "3"],
                  tmp_path)
    last = ran.stderr.strip().splitlines()[-1]
    assert ran.returncode == 2 and "its lines end with '\\r', as old Mac files do" in last, last


@pytest.fixture(scope="module")
def unix_ckpt(tmp_path_factory):
    folder = fit_in_process(tmp_path_factory.mktemp("unix"), make_text(),
                            [*TINY_GPT, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    return folder / "checkpoints" / "gpt" / "last.ckpt"


@pytest.mark.parametrize("saved", [b"ROMEO:\r\n", codecs.BOM_UTF8 + b"ROMEO:\r\n", b"ROMEO:\r"],
                         ids=["windows", "windows-with-bom", "old-mac"])
def test_prompt_files_as_editors_save_them(saved, unix_ckpt, gptnano, tmp_path):
    """`printf 'ROMEO:\\r\\n' > p.txt` was refused for '\\r' (and a BOM for '\\ufeff')."""
    (tmp_path / "p.txt").write_bytes(saved)
    predict = ["predict", "--ckpt_path", str(unix_ckpt), "--data.prompt_file", "p.txt", "--model.max_new_tokens", "4"]
    for args in ([predict] if saved == b"ROMEO:\r\n" else []) + [  # predict: the same function as generate
            ["generate", "--ckpt_path", str(unix_ckpt), "--prompt_file", "p.txt", "--max_new_tokens", "4"]]:
        ran = gptnano(args, tmp_path)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert ran.stdout.startswith("ROMEO:\n") and "\r" not in ran.stdout and "\ufeff" not in ran.stdout


def test_a_leading_byte_order_mark_is_no_character_of_the_text(tmp_path):
    text = make_text(2000)
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    a, b = Corpus(plain, "char", tmp_path / "cache"), Corpus(marked, "char", tmp_path / "cache")
    assert b.scan(verbose=False).units == a.scan(verbose=False).units  # no '\ufeff' in the vocabulary
    assert b.scan(verbose=False).n_tokens == len(text)
    tok = CharTokenizer(a.scan(verbose=False).units)
    assert list(b.prepare(tok, verbose=False).ids.read(0, 10)) == list(a.prepare(tok, verbose=False).ids.read(0, 10))
    assert Corpus(marked, "byte", tmp_path / "cache").scan(verbose=False).n_tokens == len(text) + 3  # bytes stay bytes


def test_a_utf16_text_gets_the_line_that_says_how_to_convert_it(tmp_path):
    path = tmp_path / "notepad.txt"
    path.write_text(make_text(500), encoding="utf-16")  # Notepad's "Unicode": a BOM, then UTF-16-LE
    with pytest.raises(UserError, match=r"notepad\.txt is UTF-16 \(it starts with a UTF-16 byte-order mark\): save it "
                                        r"as UTF-8 \(e\.g\. iconv -f UTF-16 -t UTF-8\); or train on its bytes with "
                                        r"--data\.tokenizer byte"):
        Corpus(path, "char", tmp_path / "cache").scan(verbose=False)
    from gptnano.data.text import read_text

    with pytest.raises(UserError, match=r"is UTF-16 .*save it as UTF-8 \(e\.g\. iconv -f UTF-16 -t UTF-8\)$"):
        read_text(path, "prompt file")


def test_the_prompt_rules():
    mac, unix, windows = CharTokenizer("\rAB"), CharTokenizer("\nAB"), CharTokenizer("\n\rAB")
    assert default_prompt(unix) == "\n" and default_prompt(mac) == "\r" and default_prompt(CharTokenizer("AB")) == "A"
    assert default_prompt(make_tokenizer("", "byte")) == "\n"
    assert as_prompt("\ufeffA\r\nB\rA", unix) == "A\nB\nA"
    assert as_prompt("A\r\nB", windows) == "A\r\nB"  # a model that knows '\r' gets it
    assert as_prompt("A\r\nB", make_tokenizer("", "byte")) == "A\r\nB"  # bytes are taken as they are
