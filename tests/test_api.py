"""gptnano.api, the Python face of `gptnano fit` that notebooks/tour.ipynb uses: a run trained in
this process lands where the command line would put it, and reads back as the tools read it;
every mistake is a one-line UserError, never an exit that would end a notebook's cell."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gptnano.api import Run, command_line_value, fit
from gptnano.errors import UserError
from tests.helpers import TINY_GPT, make_text

SETTINGS = {**dict(zip(TINY_GPT[::2], TINY_GPT[1::2])), "trainer.max_steps": 20, "trainer.val_check_interval": 10}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT fitted through the API from a fresh folder: (the folder, the Run)."""
    folder = tmp_path_factory.mktemp("api")
    (folder / "tiny.txt").write_text(make_text(), encoding="utf-8")
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        run = fit(text="tiny.txt", folder="runs", settings=SETTINGS)
    finally:
        os.chdir(cwd)
    return folder, run


@pytest.mark.e2e
def test_a_run_lands_where_the_command_line_puts_it(trained):
    folder, run = trained
    assert run.name == "gpt"  # the architecture's name, as `gptnano fit` names it
    runs = (folder / "runs").resolve()
    assert run.checkpoint.resolve() == runs / "checkpoints" / "gpt" / "last.ckpt" and run.best.is_file()
    assert run.logs.resolve() == runs / "lightning_logs" / "gpt"
    assert not (folder / "checkpoints").exists() and not (folder / "lightning_logs").exists()
    assert Run.open("gpt", folder / "runs") == run
    with pytest.raises(UserError, match="no run 'rnn' under"):
        Run.open("rnn", folder / "runs")


@pytest.mark.e2e
def test_a_run_reads_back_its_network_scalars_and_views(trained, tmp_path):
    _, run = trained
    net, tokenizer, hparams = run.load()
    assert type(net).__name__ == "GPT" and not net.training and hparams["vocab"] == tokenizer.vocab
    val = run.scalars("val/loss")
    assert [step for step, _ in val] == [10, 20] and all(isinstance(v, float) for _, v in val)
    with pytest.raises(UserError, match="no scalar 'val/los' .*: it has .*val/loss"):
        run.scalars("val/los")
    data = run.look_inside("ROMEO:\nGood sir")
    assert data["text"] == "ROMEO:\nGood sir" and data["attention"]["n_layer"] == 1
    assert data["model"]["architecture"] == "GPT" and data["source"] == str(run.best)
    page = run.page("ROMEO:\nGood sir", out=tmp_path / "gpt.html")
    assert page == tmp_path / "gpt.html" and '"format":"gptnano-inspect"' in page.read_text(encoding="utf-8")
    assert run.look_inside()["text"]  # the default passage (the model's own, for this text's characters)
    with pytest.raises(UserError, match="not in the model's vocabulary: '🙂'"):
        run.look_inside("ROMEO: 🙂")


@pytest.mark.e2e
def test_mistakes_are_one_line_user_errors_not_exits(trained, monkeypatch):
    folder, _ = trained
    monkeypatch.chdir(folder)
    with pytest.raises(UserError, match="already holds a run"):
        fit(text="tiny.txt", folder="runs", settings=SETTINGS)  # the run of the fixture: refused, not overwritten
    with pytest.raises(UserError) as refused:
        fit(text="tiny.txt", folder="runs", run_name="typo", settings={**SETTINGS, "model.net.n_layr": 2})
    assert "n_layr" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(UserError, match="unknown architecture 'Foo'"):
        fit(text="tiny.txt", folder="runs", run_name="foo", settings={**SETTINGS, "model.net": "Foo"})
    with pytest.raises(UserError, match="not found|does not exist|no such"):
        fit(text="missing.txt", folder="runs", run_name="missing", settings=SETTINGS)


@pytest.mark.e2e
def test_the_stop_button_saves_and_raises_keyboard_interrupt(tmp_path, monkeypatch):
    """A kernel's interrupt is SIGINT: the fit ends its step, saves last.ckpt and raises
    KeyboardInterrupt (the command line would exit with status 130, ending the kernel's cell)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    last = tmp_path / "runs" / "checkpoints" / "gpt" / "last.ckpt"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a job a shell started in the background

    def interrupt_once_training() -> None:
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline:  # written at the first validation: training runs
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_training, daemon=True).start()
    with pytest.raises(KeyboardInterrupt, match="last.ckpt"):
        fit(text="tiny.txt", folder="runs",
            settings={**SETTINGS, "trainer.max_steps": 100_000, "trainer.log_every_n_steps": 1})
    assert last.is_file() and signal.getsignal(signal.SIGINT) is before  # the handler given back


@pytest.mark.e2e
def test_an_interrupt_before_the_first_step_raises_keyboard_interrupt_too(tmp_path, monkeypatch):
    """Lightning answers a KeyboardInterrupt that gptnano's handler did not catch (before training
    starts, or a second Ctrl-C) with sys.exit(1); from Python it stays a KeyboardInterrupt."""
    from lightning.pytorch.callbacks import Callback

    class InterruptAtStart(Callback):
        def on_fit_start(self, trainer, pl_module):
            raise KeyboardInterrupt

    import gptnano.cli.lightning as cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    monkeypatch.setattr(cli.GPTNanoCLI, "_callbacks", lambda self, trainer: [InterruptAtStart()])
    with pytest.raises(KeyboardInterrupt):
        fit(text="tiny.txt", folder="runs", settings=SETTINGS)


def test_settings_are_written_as_the_command_line_reads_them():
    assert [command_line_value(v) for v in (True, False, None, 3, 2e-3, "GPT", [1, 2], {"a": 1})] == \
        ["true", "false", "null", "3", "0.002", "GPT", "[1, 2]", '{"a": 1}']
