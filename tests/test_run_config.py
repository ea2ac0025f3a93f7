"""The run's config travels with its weights (issue 26, items 4 and 5): every checkpoint keeps the
config its run was parsed into and the facts it was parsed before; a command that starts from a
checkpoint parses on top of that config, typed flags last; a resume is what was typed, or one line
says why not."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from gptnano.checkpoint import run_config
from tests.helpers import TINY_GPT, fit_in_process, make_text

FIXTURES = Path(__file__).parent / "fixtures"
FIT = ["fit", *TINY_GPT, "--model.optimizer", "adamw", "--trainer.precision", "32-true"]


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _ok(ran):
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran


def _refused(ran) -> str:
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    return ran.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny AdamW run on other.txt: 20 steps, validation every 10 (best.ckpt at 10 or 20)."""
    return fit_in_process(tmp_path_factory.mktemp("run"), make_text(6000, seed=3),
                          [*FIT[1:], "--trainer.max_steps", "20", "--trainer.val_check_interval", "10", "--run_name",
                           "r", "--model.temperature", "0.5"], name="other.txt")


def test_a_checkpoint_keeps_its_config_and_facts(run):
    """One config (plain data, weights_only) and one record of facts, instead of four places."""
    ckpt = _ckpt(run / "checkpoints" / "r" / "last.ckpt")
    record = ckpt["gptnano"]
    assert record["config"]["run_name"] == "r" and record["config"]["model"]["temperature"] == 0.5
    assert record["config"]["trainer"]["max_steps"] == 20 and record["config"]["data"]["path"] == "other.txt"
    assert record["device"] == "cpu" and record["precision"] == "32-true" and record["tokenizer"] == "char"
    assert record["text"]["path"] == str((run / "other.txt").resolve()) and len(record["text"]["sha256"]) == 64
    assert set(record["vocab"]) == set((run / "other.txt").read_text())
    assert "ShakespeareDataModule" not in ckpt  # the data settings are in the config now
    saved = yaml.safe_load((run / "lightning_logs" / "r" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 20 and saved["run_name"] == "r"


def test_print_config_with_a_checkpoint_prints_what_will_run(run, gptnano):
    ran = _ok(gptnano(["fit", "--ckpt_path", "last", "--run_name", "r", "--trainer.max_steps", "30",
                       "--print_config"], run))
    printed = yaml.safe_load(ran.stdout)
    assert printed["trainer"]["max_steps"] == 30  # typed
    assert printed["model"]["temperature"] == 0.5 and printed["data"]["path"] == "other.txt"  # the run's
    assert printed["model"]["net"]["init_args"]["n_embd"] == 16


def test_a_typed_flag_never_loses_to_the_checkpoint(run, gptnano):
    """Lightning 2.6 re-applies a checkpoint's hyper-parameters after parsing (LightningCLI's
    _parse_ckpt_path): kept out of its way, the typed temperature and length are what predict uses."""
    ran = _ok(gptnano(["predict", "--ckpt_path", "checkpoints/r/last.ckpt", "--model.max_new_tokens", "7",
                       "--data.prompt", "ROMEO:", "--model.temperature", "0"], run))
    assert len(ran.stdout.splitlines()[0]) == len("ROMEO:") + 7
    config = yaml.safe_load(next((run / "lightning_logs" / "r" / "eval").glob("version_*/config.yaml")).read_text())
    assert config["model"]["temperature"] == 0 and config["model"]["max_new_tokens"] == 7


def test_a_resume_trains_on_the_run_s_own_text(run, gptnano, tmp_path):
    """Begun on --data.path other.txt, resumed without it, with GPTNANO_DATA naming another text:
    the run's own text goes on (before: the default text, or GPTNANO_DATA's, without a word)."""
    for part in ("checkpoints", "lightning_logs"):
        import shutil

        shutil.copytree(run / part / "r", tmp_path / part / "r")
    (tmp_path / "elsewhere.txt").write_text(make_text(5000, seed=9), encoding="utf-8")
    ran = _ok(gptnano(["fit", "--ckpt_path", "last", "--run_name", "r", "--trainer.max_steps", "22"], tmp_path,
                      env_extra={"GPTNANO_DATA": str(tmp_path / "elsewhere.txt")}))
    text = _ckpt(tmp_path / "checkpoints" / "r" / "last.ckpt")["gptnano"]["text"]
    assert text["path"] == str((run / "other.txt").resolve()) and "reading" not in ran.stderr


def test_a_changed_text_is_refused_unless_a_path_is_typed(run, gptnano, tmp_path):
    import shutil

    for part in ("checkpoints",):
        shutil.copytree(run / part / "r", tmp_path / part / "r")
    moved = tmp_path / "copy.txt"
    shutil.copy(run / "other.txt", moved)
    # The run's text is gone (another machine): one line says what to give.
    ckpt = _ckpt(tmp_path / "checkpoints" / "r" / "last.ckpt")
    ckpt["gptnano"]["text"]["path"] = str(tmp_path / "gone.txt")
    torch.save(ckpt, tmp_path / "checkpoints" / "r" / "last.ckpt")
    line = _refused(gptnano(["fit", "--ckpt_path", "last", "--run_name", "r", "--trainer.max_steps", "22"], tmp_path))
    assert "the run's text" in line and "gone.txt is not there" in line and "give --data.path FILE" in line
    # The text changed since: refused; typed, it trains with one line saying so.
    ckpt["gptnano"]["text"]["path"] = str(moved)
    torch.save(ckpt, tmp_path / "checkpoints" / "r" / "last.ckpt")
    with moved.open("a") as f:
        f.write("ROMEO:\nmore words\n")
    line = _refused(gptnano(["fit", "--ckpt_path", "last", "--run_name", "r", "--trainer.max_steps", "22"], tmp_path))
    assert "has changed since it was trained on" in line and f"give --data.path {moved}" in line
    ran = _ok(gptnano(["fit", "--ckpt_path", "last", "--run_name", "r", "--trainer.max_steps", "22",
                       "--data.path", str(moved)], tmp_path))
    assert f"reading {moved}, not the text the run was trained on" not in ran.stderr  # same path: asked, as it is
    assert _ckpt(tmp_path / "checkpoints" / "r" / "last.ckpt")["global_step"] == 22


def test_resuming_an_older_checkpoint_never_rewinds_last(gptnano, tmp_path):
    """best.ckpt at step 10, last.ckpt at 30: before, last.ckpt was rewritten from step 10 without a word."""
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    args = [*FIT, "--data.path", "tiny.txt", "--trainer.val_check_interval", "10", "--early_stopping.patience", "100"]
    _ok(gptnano([*args, "--trainer.max_steps", "10"], tmp_path))
    folder = tmp_path / "checkpoints" / "gpt"
    (folder / "old.ckpt").write_bytes((folder / "last.ckpt").read_bytes())
    _ok(gptnano([*args, "--ckpt_path", "last", "--trainer.max_steps", "30"], tmp_path))
    before = (folder / "last.ckpt").read_bytes()
    line = _refused(gptnano([*args, "--ckpt_path", str(folder / "old.ckpt"), "--trainer.max_steps", "40"], tmp_path))
    assert "is at step 10, but" in line and "last.ckpt is at step 30" in line and "lose steps 11-30" in line
    assert (folder / "last.ckpt").read_bytes() == before
    branch = _ok(gptnano([*args, "--ckpt_path", str(folder / "old.ckpt"), "--run_name", "branch",
                          "--trainer.max_steps", "12"], tmp_path))
    assert "checkpoints in checkpoints/branch" in branch.stderr and (folder / "last.ckpt").read_bytes() == before


def test_best_is_the_best_of_the_kept_files(gptnano, tmp_path):
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    _ok(gptnano([*FIT, "--data.path", "tiny.txt", "--trainer.val_check_interval", "5", "--trainer.max_steps", "15",
                 "--checkpoint.save_top_k", "2"], tmp_path))
    folder = tmp_path / "checkpoints" / "gpt"
    kept = sorted(p.name for p in folder.glob("step=*.ckpt"))
    assert len(kept) == 2 and {"best.ckpt", "last.ckpt"} <= {p.name for p in folder.iterdir()}
    state = next(v for k, v in _ckpt(folder / "last.ckpt")["callbacks"].items() if k.startswith("Checkpoint"))
    best = Path(state["best_model_path"])
    assert best.name in kept and (folder / "best.ckpt").read_bytes() == best.read_bytes()
    assert _ok(gptnano(["validate", "--ckpt_path", "best", "--run_name", "gpt"], tmp_path))


def test_splits_the_run_did_not_hold_out_are_refused(run, gptnano):
    """Before: test --data.test_fraction 0.2 on a run trained without a test split scored text it trained on."""
    line = _refused(gptnano(["test", "--ckpt_path", "checkpoints/r/last.ckpt", "--data.test_fraction", "0.2"], run))
    assert "the run held out no test split" in line
    line = _refused(gptnano(["validate", "--ckpt_path", "checkpoints/r/last.ckpt", "--data.val_fraction", "0.25"], run))
    assert "reaches into the text this run trained on" in line
    _ok(gptnano(["validate", "--ckpt_path", "checkpoints/r/last.ckpt", "--data.val_fraction", "0.05"], run))


def test_a_checkpoint_of_today_s_main_before_the_config_generates_validates_and_resumes(gptnano, tmp_path):
    """tests/fixtures/gpt-fdc4972.ckpt: written before checkpoints kept their config (its settings
    are rebuilt from what it holds: hyper-parameters, data settings, run name and seed)."""
    from gptnano.checkpoint import load_net

    old = FIXTURES / "gpt-fdc4972.ckpt"
    expected = json.loads((FIXTURES / "gpt-fdc4972.json").read_text())
    net, tokenizer, _ = load_net(old)
    with torch.no_grad():
        logits = net(tokenizer.encode(expected["prompt"])[None])[0, -1]
    torch.testing.assert_close(logits, torch.tensor(expected["last_logits"]), rtol=0, atol=2e-6)
    config = run_config(torch.load(old, weights_only=True))
    assert config["run_name"] == "gpt" and config["data"]["batch_size"] == 4 and config["model"]["optimizer"] == "muon"
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    _ok(gptnano(["fit", "--ckpt_path", str(old), "--run_name", "old", "--data.path", "tiny.txt",
                 "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"], tmp_path))
    resumed = _ckpt(tmp_path / "checkpoints" / "old" / "last.ckpt")
    assert resumed["global_step"] == 5 and resumed["gptnano"]["config"]["model"]["optimizer"] == "muon"
    assert any(k.startswith("gptnano.EarlyStopping{") for k in resumed["callbacks"])  # its state moved to today's key
    _ok(gptnano(["validate", "--ckpt_path", str(old), "--data.path", "tiny.txt"], tmp_path))
    out = _ok(gptnano(["generate", "--ckpt_path", str(old), "--prompt", "ROMEO:", "--max_new_tokens", "5"], tmp_path))
    assert out.stdout.startswith("ROMEO:")


def test_tools_take_their_defaults_from_the_config(run, tmp_path):
    """generate, senses and export read the sampling settings of the run's config (load_net)."""
    from gptnano.checkpoint import load_net

    ckpt = _ckpt(run / "checkpoints" / "r" / "last.ckpt")
    assert load_net(run / "checkpoints" / "r" / "last.ckpt").hparams["temperature"] == 0.5
    ckpt["gptnano"]["config"]["model"]["temperature"] = 0.3
    torch.save(ckpt, tmp_path / "edited.ckpt")
    assert load_net(tmp_path / "edited.ckpt").hparams["temperature"] == 0.3


def test_fast_dev_run_writes_nothing_so_a_real_run_of_the_name_follows(gptnano, tmp_path):
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    _ok(gptnano([*FIT, "--data.path", "tiny.txt", "--trainer.fast_dev_run", "2"], tmp_path))
    assert not list(tmp_path.glob("checkpoints/gpt/*")) and not (tmp_path / "lightning_logs").exists()
    _ok(gptnano([*FIT, "--data.path", "tiny.txt", "--trainer.max_steps", "2"], tmp_path))
    assert _ckpt(tmp_path / "checkpoints" / "gpt" / "last.ckpt")["global_step"] == 2
    assert os.listdir(tmp_path / "lightning_logs" / "gpt") == ["version_0"]


def test_resolved_config_is_what_fit_would_run_and_builds_nothing(run, monkeypatch):
    """``resolved_config`` (what `gptnano compare` asks of fit): the checkpoint's config as the base,
    the typed flags over it, the run's name, folder and text resolved, as plain data; a folder that
    holds a run is not refused, nothing is written, and a mistake is one line."""
    from gptnano.compare.resolve import resolved_config
    from gptnano.errors import UserError

    monkeypatch.chdir(run)
    before = (dict(os.environ), sorted(p.relative_to(run) for p in run.rglob("*")))
    config = resolved_config(["--ckpt_path", "last", "--run_name", "r", "--trainer.max_steps", "30"])
    assert config["trainer"]["max_steps"] == 30 and config["model"]["temperature"] == 0.5  # typed; the run's
    assert config["run_name"] == "r" and Path(config["checkpoint"]["dirpath"]) == Path("checkpoints", "r")
    assert Path(config["data"]["path"]).name == "other.txt" and config["model"]["net"]["init_args"]["n_embd"] == 16
    assert yaml.safe_load(yaml.safe_dump(config)) == config  # plain data
    fresh = resolved_config([*TINY_GPT, "--run_name", "r"])  # `fit` would refuse: checkpoints/r holds a run
    assert fresh["run_name"] == "r" and fresh["trainer"]["max_steps"] == 2000
    assert (dict(os.environ), sorted(p.relative_to(run) for p in run.rglob("*"))) == before
    with pytest.raises(UserError) as e:
        resolved_config([*TINY_GPT, "--model.net.n_layers", "2"])
    assert "n_layers" in str(e.value) and "\n" not in str(e.value)
