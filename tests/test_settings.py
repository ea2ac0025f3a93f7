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
