"""Files written by older versions of gptnano still work.

``tests/fixtures/`` holds what ``gptnano fit`` wrote at commit 45612a8, before the
package was regrouped into layers: a tiny GPT checkpoint (Muon, 3 steps, on
``make_text()``), the last-position logits it gave for a prompt then, and the
``config.yaml`` that run saved (it names ``gptnano.board.Board``, since moved).
"""

import json
from pathlib import Path

import torch

from gptnano.checkpoint import load_net
from tests.helpers import make_text

FIXTURES = Path(__file__).parent / "fixtures"
OLD_GPT = FIXTURES / "gpt-45612a8.ckpt"


def test_an_old_checkpoint_loads_and_gives_the_same_logits():
    expected = json.loads((FIXTURES / "gpt-45612a8.json").read_text())
    net, tokenizer, hparams = load_net(OLD_GPT)
    assert hparams["net"]["class_path"] == "gptnano.models.GPT"
    with torch.no_grad():
        logits = net(tokenizer.encode(expected["prompt"])[None])[0, -1]
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits"]), rtol=0, atol=2e-6)


def test_an_old_checkpoint_resumes_validates_and_predicts(tmp_path, gptnano):
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    fit = gptnano(["fit", "--ckpt_path", str(OLD_GPT), "--run_name", "old", "--data.path", "tiny.txt",
                   "--trainer.max_steps", "5", *quiet], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    resumed = torch.load(tmp_path / "checkpoints" / "old" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 5 and resumed["hyper_parameters"]["optimizer"] == "muon"
    val = gptnano(["validate", "--ckpt_path", str(OLD_GPT), "--data.path", "tiny.txt", *quiet], tmp_path)
    assert val.returncode == 0 and "val/loss" in val.stdout, val.stderr[-3000:]
    out = gptnano(["predict", "--ckpt_path", str(OLD_GPT), "--data.prompt", "ROMEO:", "--model.max_new_tokens", "10"],
                  tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("ROMEO:"), out.stderr[-3000:]


def test_an_old_saved_config_names_moved_classes_and_still_runs(tmp_path, gptnano):
    """A run's saved config.yaml, given back with --config, trains again: the logger class
    it names moved from gptnano.board to gptnano.train.logger, and one line says so."""
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    config = (FIXTURES / "config-45612a8.yaml").read_text()
    assert "gptnano.board.Board" in config
    (tmp_path / "config.yaml").write_text(config)
    ran = gptnano(["fit", "--config", "config.yaml", "--run_name", "again", "--trainer.max_steps", "2"], tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "names gptnano.board.Board, since moved: read as gptnano.train.logger.Board" in ran.stderr
    assert list((tmp_path / "lightning_logs" / "again").glob("version_0/events.out.tfevents.*"))
    assert torch.load(tmp_path / "checkpoints" / "again" / "last.ckpt", weights_only=True)["global_step"] == 2
