"""Where a run's settings come from (gptnano/cli/settings.py, the refusal table of
gptnano/checkpoint.py, the Trainer checks of gptnano/train/trainer_args.py), on plain dicts: no
Lightning, no parser, no files but the ones a case writes. The checkpoint's config is the parser's base, the
command line applies over it; one table says what may not change."""

import pytest
import yaml

from gptnano.checkpoint import REFUSED, refusals, without
from gptnano.cli import settings
from gptnano.errors import UserError
from gptnano.train.trainer_args import check_trainer

SAVED = {  # a checkpoint's config, as gptnano.checkpoint.run_config returns it
    "seed_everything": 7, "run_name": "lr2", "ckpt_path": "checkpoints/lr2/last.ckpt", "init_from": None,
    "trainer": {"max_steps": 10, "precision": "bf16-mixed", "accelerator": "cpu", "devices": 1, "fast_dev_run": False},
    "model": {"net": {"class_path": "gptnano.models.GPT", "init_args": {"n_layer": 2, "n_embd": 32, "dropout": 0.0}},
              "learning_rate": 1e-3, "optimizer": "adamw"},
    "data": {"path": "tiny.txt", "batch_size": 4, "val_fraction": 0.1, "test_fraction": 0.0, "vocab": "abc",
             "tokenizer": "char"},
    "checkpoint": {"monitor": "val/loss", "mode": "min", "every_n_train_steps": None},
    "early_stopping": {"monitor": "val/loss", "mode": "min", "patience": 1},
}
FIXED = {"n_layer", "n_embd"}  # what the GPT's weights fix (dropout is a run setting)


def asked(**changes) -> dict:
    """SAVED with dotted keys changed, as a command on top of it would parse it."""
    config = yaml.safe_load(yaml.safe_dump(SAVED))
    for key, value in changes.items():
        *path, last = key.replace("__", ".").split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def refuse(config: dict, fitting: bool = True) -> None:
    refusals(SAVED, config, fitting=fitting, fixed=FIXED, source="run/last.ckpt")


def test_the_base_holds_the_run_and_not_the_machine_nor_the_command():
    base = without(SAVED)
    assert "ckpt_path" not in base and "init_from" not in base
    assert base["trainer"] == {"max_steps": 10}  # precision, accelerator, devices, fast_dev_run: this machine's
    assert base["model"] == SAVED["model"] and SAVED["trainer"]["precision"] == "bf16-mixed"  # the original is kept
    argv = settings.with_base(["fit", "--ckpt_path", "last", "--model.learning_rate", "1e-4"], "fit", base)
    assert argv[0] == "fit" and argv[1].startswith("--config=") and argv[2:] == ["--ckpt_path", "last",
                                                                                 "--model.learning_rate", "1e-4"]
    assert yaml.safe_load(argv[1].removeprefix("--config=")) == base  # first: whatever is typed after it wins


def test_settings_that_apply_are_not_refused():
    refuse(asked(model__learning_rate=1e-4, data__batch_size=8, early_stopping__patience=100,
                 model__net__init_args__dropout=0.2))
    refuse(asked(checkpoint__every_n_train_steps=0))  # None and 0 both mean off


def test_network_sizes_are_the_weights():
    with pytest.raises(UserError, match=r"run/last\.ckpt cannot take n_layer=4 \(saved: 2\): its saved weights "
                                        r"have other shapes"):
        refuse(asked(model__net__init_args__n_layer=4), fitting=False)
    with pytest.raises(UserError, match="holds a GPT network, but --config or --model.net ask for RNN"):
        refuse(asked(model__net__class_path="gptnano.models.RNN"), fitting=False)


@pytest.mark.parametrize("key,value,fitting,error", [
    ("checkpoint.monitor", "val/bpc", True, r"--checkpoint\.monitor val/bpc cannot change on resume \(the run's is "
                                            r"val/loss\): best\.ckpt and its score are kept by this metric"),
    ("model.optimizer", "muon", True, r"--model\.optimizer muon cannot change on resume"),
    ("data.val_fraction", 0.2, True, r"--data\.val_fraction 0\.2 cannot change on resume"),
    ("data.tokenizer", "byte", False, r"--data\.tokenizer byte cannot change on a checkpoint"),
    ("data.vocab", "xyz", False, r"--data\.vocab xyz cannot change"),
])
def test_what_may_not_change_is_one_table(key, value, fitting, error):
    with pytest.raises(UserError, match=error):
        refuse(asked(**{key.replace(".", "__"): value}), fitting=fitting)


def test_an_evaluation_may_score_another_split_a_resume_may_not():
    refuse(asked(data__val_fraction=0.05), fitting=False)
    with pytest.raises(UserError):
        refuse(asked(data__val_fraction=0.05), fitting=True)


@pytest.mark.parametrize("sub,data,error", [
    ("test", {"test_fraction": 0.2}, r"the run held out no test split"),
    ("validate", {"val_fraction": 0.3}, r"reaches into the text this run trained on"),
    ("test", {"test_fraction": 0.1, "val_fraction": 0.1}, None),  # held out by a run with test_fraction 0.1
    ("validate", {"val_fraction": 0.05}, None),  # a part of the run's validation split
])
def test_evaluating_on_trained_text_is_refused(sub, data, error):
    from gptnano.data.datamodule import check_splits

    saved = {"val_fraction": 0.1, "test_fraction": 0.1 if error is None and sub == "test" else 0.0}
    if error is None:
        check_splits(saved, {"val_fraction": 0.1, "test_fraction": 0.0, **data}, sub)
    else:
        with pytest.raises(UserError, match=error):
            check_splits(saved, {"val_fraction": 0.1, "test_fraction": 0.0, **data}, sub)


def test_what_the_command_line_alone_says(tmp_path):
    argv = ["predict", "--config", "a.yaml", "-c", "b.yaml", "--ckpt_path", "last", "--run_name=lr2",
            "--model.net.init_args.n_layer", "3", "--trainer.default_root_dir", "runs"]
    cmd = settings.read_command_line(argv, ["fit", "predict"])
    assert cmd.subcommand == "predict" and cmd.ckpt_path == "last" and cmd.run_name == "lr2" and cmd.root == "runs"
    assert cmd.configs == ["a.yaml", "b.yaml"] and {"model.net.n_layer", "run_name", "ckpt_path"} <= cmd.typed
    folder = settings.run_folder(cmd.run_name, cmd.dirpath, cmd.root)
    assert folder == tmp_path.__class__("runs/checkpoints/lr2")
    with pytest.raises(UserError, match=r"--ckpt_path last: no .*lr2/last\.ckpt to predict from"):
        settings.named_file("last", tmp_path / "lr2", "predict")
    (tmp_path / "lr2").mkdir()
    (tmp_path / "lr2" / "last.ckpt").write_bytes(b"")
    assert settings.named_file("last", tmp_path / "lr2", "predict") == str(tmp_path / "lr2" / "last.ckpt")
    with pytest.raises(UserError, match=r"--ckpt_path best needs --run_name NAME \(or --config FILE\)"):
        settings.named_file("best", None, "validate")


def test_short_architecture_names_and_moved_class_paths(tmp_path, capsys):
    assert settings.architecture_names(["fit", "--model.net", "rnn"]) == ["fit", "--model.net", "RNN"]
    with pytest.raises(UserError, match="unknown architecture 'Transformer9'"):
        settings.architecture_names(["fit", "--model.net", "Transformer9"])
    config = tmp_path / "config.yaml"
    config.write_text("trainer:\n  logger:\n    class_path: gptnano.board.Board\n")
    argv = settings.moved_class_paths(["fit", "--config", str(config)])
    assert argv[2] == "trainer:\n  logger:\n    class_path: gptnano.train.logger.Board\n"
    assert "since moved: read as gptnano.train.logger.Board" in capsys.readouterr().err
    untouched = tmp_path / "new.yaml"
    untouched.write_text("trainer:\n  logger:\n    class_path: gptnano.train.logger.Board\n")
    assert settings.moved_class_paths(["fit", f"--config={untouched}"]) == ["fit", f"--config={untouched}"]


@pytest.mark.parametrize("trainer,error", [
    ({"max_steps": 0}, r"max_steps must be a positive number of optimizer steps, or -1 with"),
    ({"max_steps": -1}, r"or -1 with --trainer\.max_epochs or --trainer\.max_time to bound the run, got -1"),
    ({"max_steps": 10, "val_check_interval": 0}, r"val_check_interval must be a positive number of steps"),
    ({"max_steps": 10, "val_check_interval": 1.5}, r"val_check_interval must be"),
    ({"max_steps": 10, "accumulate_grad_batches": 0}, r"accumulate_grad_batches must be a whole number >= 1, got 0"),
    ({"max_steps": 10, "log_every_n_steps": 0}, r"log_every_n_steps must be a whole number >= 1"),
    ({"max_steps": 10, "gradient_clip_val": -1.0}, r"gradient_clip_val must be >= 0"),
    ({"max_steps": 10, "limit_train_batches": -0.5}, r"limit_train_batches must be >= 0"),
    ({"max_steps": 10, "max_time": "00:00:00:00"}, r"max_time must be a positive duration"),
    ({"max_steps": 10, "barebones": True}, r"--trainer\.barebones is not supported by gptnano: it turns off self\.log"),
])
def test_trainer_settings_that_cannot_work(trainer, error):
    with pytest.raises(UserError, match=error):
        check_trainer(trainer)


def test_trainer_settings_that_work():
    assert check_trainer({"max_steps": 10, "val_check_interval": 5, "accumulate_grad_batches": 2,
                                   "gradient_clip_val": 0.0, "max_time": "00:00:05:00", "log_every_n_steps": 1}) == {}
    assert check_trainer({"max_steps": -1, "max_epochs": 2}) == {}
    assert check_trainer({"max_steps": -1, "max_time": {"minutes": 5}}) == {}
    # a fraction of an epoch counts epochs: validation then follows every epoch, unless that was typed
    assert check_trainer({"max_steps": 10, "val_check_interval": 0.5}) == {"check_val_every_n_epoch": 1}
    typed = {"trainer.check_val_every_n_epoch"}
    assert check_trainer({"max_steps": 10, "val_check_interval": 0.5, "check_val_every_n_epoch": None},
                                  typed) == {}
    assert check_trainer({"max_steps": 10, "val_check_interval": "00:00:01:00"}) == {}  # Lightning's duration


def test_the_reliability_table_is_the_code_s():
    """docs/reliability.md's resume table names every row of REFUSED as refused on a resume, and a
    row refused by every command is refused in its evaluation column too."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    table = doc[doc.index("| setting | a resume"):doc.index("A resume that changes a batch size")]
    for key, (who, _) in REFUSED.items():
        row = next((line for line in table.splitlines() if f"`{key}`" in line), None)
        assert row is not None, f"docs/reliability.md has no row for {key}"
        resume, evaluation = [cell.strip() for cell in row.split("|")[2:4]]
        assert resume.startswith("refused") and evaluation.startswith("refused" if who == "every" else "applies"), row
