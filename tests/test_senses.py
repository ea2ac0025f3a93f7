"""inspect_senses: one readable row per sense, listing what that sense predicts."""

import pytest
import torch

from gptnano.cli.senses import inspect_senses, show_char
from gptnano.models.backpack import Backpack
from gptnano.models.gpt import GPT
from tests.helpers import scrambled

VOCAB = "\n !abcdeXYZ\t"  # whitespace included on purpose: it must print visibly
SENSES, K = 4, 3


@pytest.fixture
def model() -> Backpack:
    torch.manual_seed(0)
    return scrambled(Backpack(vocab_size=len(VOCAB), block_size=8, n_layer=1, n_head=2, n_embd=16, n_senses=SENSES))


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines()[2:]]  # two header lines


def test_one_row_per_sense_with_k_characters_each_end(model):
    table = inspect_senses(model, VOCAB, "e", K)
    assert len(rows(table)) == SENSES
    for sense, row in enumerate(rows(table)):
        assert row[0] == str(sense)
        assert len(row) == 1 + 2 * K, row
        assert set(row[1:]) <= {show_char(c) for c in VOCAB}


def test_rows_list_the_highest_and_lowest_sense_logits_in_order(model):
    logits = model.sense_logits(VOCAB.index(" ")).detach()
    for sense, row in enumerate(rows(inspect_senses(model, VOCAB, " ", K))):
        top = [show_char(VOCAB[i]) for i in logits[sense].argsort(descending=True)[:K]]
        bottom = [show_char(VOCAB[i]) for i in logits[sense].argsort()[:K]]
        assert row[1:] == top + bottom


def test_whitespace_is_shown_visibly():
    assert [show_char(c) for c in "\n \ta"] == ["\\n", "␣", "\\t", "a"]


def test_inspection_leaves_the_model_as_it_was(model):
    model.train()
    inspect_senses(model, VOCAB, "a", K)
    assert model.training


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="token"):
        inspect_senses(model, VOCAB, "q", K)
    with pytest.raises(ValueError, match="k must be"):
        inspect_senses(model, VOCAB, "a", len(VOCAB) + 1)
    with pytest.raises(ValueError, match="vocab_size"):
        inspect_senses(model, VOCAB[:-1], "a", K)
    with pytest.raises(TypeError, match="Backpack"):
        inspect_senses(GPT(vocab_size=len(VOCAB), block_size=8, n_layer=1, n_head=2, n_embd=16), VOCAB, "a", K)


def test_senses_command_on_a_trained_checkpoint(tmp_path):
    """`gptnano senses` on a tiny trained Backpack prints the table and two generations."""
    from tests.helpers import make_text, run_cli

    text = tmp_path / "tiny.txt"
    text.write_text(make_text(), encoding="utf-8")
    run_cli(["fit", "--model.net", "Backpack", "--model.net.block_size", "16", "--model.net.n_layer", "1",
             "--model.net.n_head", "2", "--model.net.n_embd", "16", "--model.net.n_senses", "4",
             "--data.path", str(text), "--data.batch_size", "4", "--trainer.max_steps", "5",
             "--trainer.enable_progress_bar", "false"], tmp_path)
    ckpt = tmp_path / "checkpoints" / "backpack" / "last.ckpt"
    out = run_cli(["senses", "--ckpt_path", str(ckpt), "--token", "e", "--k", "3", "--sense", "2",
                   "--prompt", "ROMEO:", "--max_new_tokens", "30"], tmp_path).stdout
    lines = out.splitlines()
    table = lines[2:2 + 4]
    assert [row.split()[0] for row in table] == ["0", "1", "2", "3"]
    assert all(len(row.split()) == 1 + 2 * 3 for row in table)
    assert "--- all senses" in out and "--- sense 2 x 0" in out
    generated = [lines[i + 1] for i, l in enumerate(lines) if l.startswith("--- ")]
    assert all(g.startswith("ROMEO:") for g in generated)

    bad = run_cli(["senses", "--ckpt_path", str(ckpt), "--token", "€"], tmp_path, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "token" in bad.stderr
