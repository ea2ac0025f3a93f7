"""The rule "a checkpoint supplies the settings, typed flags win" (gptnano/cli/settings.py),
on plain dicts: no Lightning, no parser, no files but the ones a case writes."""

import pytest

from gptnano.cli import settings
from gptnano.errors import UserError

SAVED = {
    "net": {"class_path": "gptnano.models.GPT", "init_args": {"n_layer": 2, "n_embd": 32, "dropout": 0.0}},
    "learning_rate": 1e-3, "temperature": 0.8, "optimizer": "muon", "vocab": "abc", "tokenizer": "char",
}
# What a --config file asks for: another size, another learning rate, another temperature.
CONFIG = {"net": {"class_path": "gptnano.models.GPT", "init_args": {"n_layer": 4, "n_embd": 128, "dropout": 0.0}},
          "learning_rate": 4e-3, "temperature": 1.0, "optimizer": "muon", "vocab": "", "tokenizer": "char"}


def merged(typed=(), model=None, fits=lambda args: args["n_layer"] == 2 and args["n_embd"] == 32):
    return settings.from_checkpoint(SAVED, "GPT", SAVED["net"]["init_args"], model or CONFIG, set(typed),
                                    weights_fit=fits, source="run/last.ckpt")


def test_the_checkpoint_wins_over_config_files():
    chosen = merged()
    assert chosen["model.net.init_args.n_layer"] == 2 and chosen["model.net.init_args.n_embd"] == 32
    assert chosen["model.learning_rate"] == 1e-3 and chosen["model.temperature"] == 0.8
    assert chosen["data.vocab"] == "abc" and chosen["data.tokenizer"] == "char"


def test_typed_flags_win_over_the_checkpoint():
    chosen = merged(typed={"model.temperature", "model.learning_rate"})
    assert "model.temperature" not in chosen and "model.learning_rate" not in chosen  # the parsed value stays


def test_typed_network_sizes_only_where_the_weights_fit():
    model = {**CONFIG, "net": {**CONFIG["net"], "init_args": {**CONFIG["net"]["init_args"], "dropout": 0.2}}}
    assert merged(typed={"model.net.dropout"}, model=model)["model.net.init_args.dropout"] == 0.2
    with pytest.raises(UserError, match=r"run/last\.ckpt cannot take n_layer=4 \(saved: 2\)"):
        merged(typed={"model.net.n_layer"})
    assert merged(typed={"model.net.n_layer"}, fits=lambda args: True)["model.net.init_args.n_layer"] == 4


def test_the_vocabulary_is_always_the_checkpoint_s():
    assert merged(typed={"data.vocab"})["data.vocab"] == "abc"


def test_another_architecture_is_refused():
    with pytest.raises(UserError, match="holds a GPT network, but --config or --model.net ask for RNN"):
        settings.from_checkpoint(SAVED, "RNN", SAVED["net"]["init_args"], CONFIG, set(), weights_fit=lambda a: True,
                                 source="x.ckpt")


def test_what_the_command_line_alone_says(tmp_path, monkeypatch):
    argv = ["predict", "--config", "a.yaml", "-c", "b.yaml", "--ckpt_path", "last", "--run_name=lr2",
            "--model.net.init_args.n_layer", "3", "--data.prompt", "x"]
    cmd = settings.read_command_line(argv, ["fit", "predict"])
    assert cmd.subcommand == "predict" and cmd.ckpt_path == "last" and cmd.run_name == "lr2"
    assert cmd.configs == ["a.yaml", "b.yaml"]
    assert {"model.net.n_layer", "data.prompt", "run_name", "ckpt_path"} <= cmd.typed
    monkeypatch.chdir(tmp_path)
    assert settings.checkpoint_named(cmd) is None  # no checkpoints/lr2/last.ckpt yet
    (tmp_path / "checkpoints" / "lr2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "lr2" / "last.ckpt").write_bytes(b"")
    assert settings.checkpoint_named(cmd) == "checkpoints/lr2/last.ckpt"
    file = settings.read_command_line(["validate", "--ckpt_path", "some/file.ckpt"], ["validate"])
    assert settings.checkpoint_named(file) == "some/file.ckpt"


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


# ----- issue 19: what a resume takes from the checkpoint, applies, or refuses ------------------
CKPT = {
    "hyper_parameters": {**SAVED, "optimizer": "adamw"},
    "gptnano": {"run_name": "lr2", "seed": 7, "precision": "32-true"},
    "ShakespeareDataModule": {"batch_size": 4, "val_fraction": 0.1, "val_tokens": None},
    "callbacks": {
        "EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}": {"patience": 1, "wait_count": 1},
        "Checkpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
        "'train_time_interval': None}": {"best_model_score": 1.5},
    },
}


def test_what_a_checkpoint_knows_of_its_run():
    found = settings.saved_settings(CKPT)
    assert found == {"run_name": "lr2", "seed_everything": 7, "data.batch_size": 4, "data.val_fraction": 0.1,
                     "data.val_tokens": None, "model.optimizer": "adamw", "early_stopping.monitor": "val/loss",
                     "early_stopping.mode": "min", "early_stopping.patience": 1, "checkpoint.monitor": "val/loss",
                     "checkpoint.mode": "min", "checkpoint.every_n_train_steps": 0}
    assert settings.saved_settings({"hyper_parameters": {}}) == {}  # an older checkpoint knows less


def test_a_resume_takes_the_saved_settings_applies_typed_ones_and_refuses_a_few():
    found = settings.saved_settings(CKPT)
    asked = {**found, "data.batch_size": 8, "early_stopping.patience": 100, "checkpoint.every_n_train_steps": None}
    chosen = settings.on_resume(found, asked, {"data.batch_size", "early_stopping.patience"}, fitting=True, source="x")
    assert "data.batch_size" not in chosen and "early_stopping.patience" not in chosen  # typed: applied as parsed
    assert chosen["run_name"] == "lr2" and chosen["seed_everything"] == 7 and chosen["data.val_fraction"] == 0.1
    assert "checkpoint.every_n_train_steps" not in chosen  # compared only: setting it would change Lightning's key
    with pytest.raises(UserError, match=r"--checkpoint\.monitor val/bpc cannot change on resume \(the run's is val/loss\)"):
        settings.on_resume(found, {**asked, "checkpoint.monitor": "val/bpc"}, {"checkpoint.monitor"}, fitting=True,
                           source="x")
    same = settings.on_resume(found, asked, {"checkpoint.every_n_train_steps", "model.optimizer"}, fitting=True, source="x")
    assert "model.optimizer" not in same  # typed, but the run's own value: nothing to refuse
    # validate / test may score another split: only fit refuses it
    settings.on_resume(found, {**asked, "data.val_fraction": 0.2}, {"data.val_fraction"}, fitting=False, source="x")
    with pytest.raises(UserError, match=r"--data\.tokenizer byte cannot change"):
        settings.on_resume({"data.tokenizer": "char"}, {"data.tokenizer": "byte"}, {"data.tokenizer"}, fitting=False,
                           source="x")


@pytest.mark.parametrize("trainer,error", [
    ({"max_steps": 0}, r"max_steps must be a positive number of optimizer steps, got 0"),
    ({"max_steps": 10, "val_check_interval": 0}, r"val_check_interval must be a positive number of steps"),
    ({"max_steps": 10, "val_check_interval": 1.5}, r"val_check_interval must be"),
    ({"max_steps": 10, "accumulate_grad_batches": 0}, r"accumulate_grad_batches must be a whole number >= 1, got 0"),
    ({"max_steps": 10, "log_every_n_steps": 0}, r"log_every_n_steps must be a whole number >= 1"),
    ({"max_steps": 10, "gradient_clip_val": -1.0}, r"gradient_clip_val must be >= 0"),
    ({"max_steps": 10, "max_time": "00:00:00:00"}, r"max_time must be a positive duration"),
])
def test_trainer_settings_that_cannot_work(trainer, error):
    with pytest.raises(UserError, match=error):
        settings.check_trainer(trainer)


def test_trainer_settings_that_work():
    settings.check_trainer({"max_steps": 10, "val_check_interval": 5, "accumulate_grad_batches": 2,
                            "gradient_clip_val": 0.0, "max_time": "00:00:05:00", "log_every_n_steps": 1})
    settings.check_trainer({"max_steps": 10, "val_check_interval": 0.5, "max_time": {"minutes": 5}})


def test_last_and_best_without_a_run_to_look_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = settings.read_command_line(["predict", "--ckpt_path", "last"], ["predict"])
    assert settings.missing_checkpoint(cmd).startswith("--ckpt_path last needs --run_name NAME (or --config FILE)")
    cmd = settings.read_command_line(["predict", "--ckpt_path", "best", "--run_name", "x"], ["predict"])
    assert settings.missing_checkpoint(cmd) == ("--ckpt_path best: no checkpoints/x/best.ckpt to predict from "
                                                "(train first, or pass a checkpoint file)")
    with_config = settings.read_command_line(["predict", "--ckpt_path", "last", "--config", "c.yaml"], ["predict"])
    assert settings.missing_checkpoint(with_config) is None  # the config names the run: the CLI finds the folder
