"""Every OS: batches read without ``os.pread``, the build lock without ``fcntl``, and Ctrl-C
stopping a run through an in-process flag instead of a signal to itself (on Windows that
signal would kill the process before it saves). The Unix-only pieces are taken away here,
on Linux, so the paths Windows takes run on every test run."""

import signal
import threading
import time

import numpy as np
import pytest
import torch

from gptnano.data import tokens as tokens_module
from gptnano.data.tokens import Tokens
from gptnano.train.checkpointing import STOP, Checkpoint
from tests.helpers import TINY_GPT, WITHOUT_UNIX, posix_only, start_cli, wait_for


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_windows_read_without_pread_are_the_same_bytes(dtype, tmp_path, monkeypatch):
    ids = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, 10_000, dtype=np.int64).astype(dtype)
    path = tmp_path / "ids.bin"
    path.write_bytes(ids.tobytes())
    view = Tokens(path, dtype)[1000:9000]  # a view: reads are offset by its start
    starts = np.array([0, 17, 3999, 7936, 5])
    with_pread = view.rows(starts, 64)
    assert np.array_equal(with_pread, np.stack([ids[1000 + s:1000 + s + 64] for s in starts]))
    monkeypatch.delattr(tokens_module.os, "pread")
    assert not hasattr(tokens_module.os, "pread")
    assert np.array_equal(view.rows(starts, 64), with_pread)
    assert np.array_equal(np.asarray(view), ids[1000:9000])


def test_threads_share_a_file_without_pread(tmp_path, monkeypatch):
    """The fallback seeks a position every view of the file shares: reads of two threads
    must not interleave between one's seek and its read."""
    ids = np.arange(50_000, dtype=np.uint16)
    path = tmp_path / "ids.bin"
    path.write_bytes(ids.tobytes())
    monkeypatch.delattr(tokens_module.os, "pread")
    whole = Tokens(path, np.uint16)
    views, wrong = [whole[:25_000], whole[25_000:]], []

    def read(view, seed):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            starts = rng.integers(0, len(view) - 32, 8)
            got = view.rows(starts, 32)
            if not np.array_equal(got, np.stack([view.start + s + np.arange(32) for s in starts])):
                wrong.append(seed)

    threads = [threading.Thread(target=read, args=(views[i % 2], i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_ctrl_c_is_a_flag_read_at_the_end_of_an_optimizer_step(monkeypatch):
    """The handler only sets the flag (no os.kill); the step that ends next asks Lightning's
    loop to stop, and not in the middle of an accumulated step."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setattr(ModelCheckpoint, "on_train_batch_end", lambda *a: None)  # Lightning's own saving: not here
    monkeypatch.setattr("os.kill", lambda *a: pytest.fail("a signal was sent"))
    monkeypatch.setattr(signal, "raise_signal", lambda *a: pytest.fail("a signal was raised"), raising=False)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accumulate_grad_batches=3)
    checkpoint = Checkpoint(save_last=True)
    saved = []
    monkeypatch.setattr(Checkpoint, "_save_last_checkpoint", lambda self, *a: saved.append(a))
    previous = signal.getsignal(signal.SIGINT)
    checkpoint.on_train_start(trainer, None)
    try:
        assert not STOP.is_set()
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what Python calls on Ctrl-C
        assert STOP.is_set() and not trainer.received_sigterm
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a second one interrupts at once
        checkpoint.on_train_batch_end(trainer, None, None, None, batch_idx=0)  # micro-batch 1 of 3
        assert not trainer.received_sigterm
        checkpoint.on_train_batch_end(trainer, None, None, None, batch_idx=2)  # the update
        assert trainer.received_sigterm  # Lightning's loop raises SIGTERMException at the end of this step
    finally:
        checkpoint._restore_signals()
        STOP.clear()
    assert signal.getsignal(signal.SIGINT) is previous and saved == []  # saving is on_exception's job


@pytest.mark.parametrize("pressed_on", ["this process", "another process"])
def test_every_ddp_process_stops_after_the_same_step(pressed_on, monkeypatch):
    """Under DDP the flag is agreed through the strategy at every step: Ctrl-C on any process
    stops all of them after the same step (none is left waiting in a collective), and each
    exits as stopped by Ctrl-C."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setattr(ModelCheckpoint, "on_train_batch_end", lambda *a: None)  # Lightning's own saving: not here
    asked = []

    def any_process(decision, all=True):
        asked.append((decision, all))
        return True  # some process had it set

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=any_process),
                              accumulate_grad_batches=1, _signal_connector=SimpleNamespace(received_sigterm=False))
    if pressed_on == "this process":
        STOP.set()
    try:
        Checkpoint().on_train_batch_end(trainer, None, None, None, batch_idx=0)
        assert STOP.is_set() and trainer._signal_connector.received_sigterm
    finally:
        STOP.clear()
    assert asked == [(pressed_on == "this process", False)]  # any process's Ctrl-C counts


@posix_only("SIGTERM, SIGINT and SIGHUP sent to another process: on Windows SIGTERM kills it outright, "
            "Ctrl-C reaches only a console's processes, and there is no SIGHUP")
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C without pread, fcntl or signals to itself", "SIGHUP"])
def test_a_stopped_run_saves_the_step_reached(how, text_file, tmp_path):
    """SIGTERM from outside (Lightning's handler) exits 143; Ctrl-C exits 130, here in a process
    that has no os.pread, no fcntl (the build lock is filelock's portable one) and may not
    signal itself: what Windows has; SIGHUP (the terminal closed) exits 129. Each way last.ckpt
    holds the step the line names."""
    args = ["fit", *TINY_GPT, "--data.path", str(text_file), "--trainer.max_steps", "100000",
            "--trainer.val_check_interval", "50", "--checkpoint.last_every_n_steps", "0"]
    last = tmp_path / "checkpoints" / "gpt" / "last.ckpt"
    ctrl_c = how.startswith("Ctrl-C")
    proc = start_cli(args, tmp_path, launcher=WITHOUT_UNIX if ctrl_c else None)
    wait_for(last, proc)  # the first validation (step 50) wrote one
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT if ctrl_c else getattr(signal, how))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == {"SIGTERM": 143, "SIGHUP": 129}.get(how, 130), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("gptnano: stopped at step"))
    reached = int(line.split("step ")[1].split(" ")[0])
    assert reached > 50 and torch.load(last, weights_only=True)["global_step"] == reached
    assert f"by {'Ctrl-C' if ctrl_c else how}, saved" in line
    if ctrl_c:  # the launcher's own report: the pieces really were missing, and the lock was filelock's soft one
        assert "without: os.pread fcntl self-signals; lock SoftFileLock" in err


@posix_only("SIGHUP and a closed terminal are POSIX's")
def test_sighup_saves_though_the_terminal_is_gone_and_nohup_trains_on(text_file, tmp_path):
    """The terminal closes: SIGHUP arrives and every later write to it fails. The run still saves the
    step it reached and exits 129 (its progress lines go to the dead stream at every step). Started
    under nohup (SIGHUP ignored), the same signal leaves it training."""
    import subprocess
    import sys

    from tests.helpers import cli_env

    args = [sys.executable, "-m", "gptnano", "fit", *TINY_GPT, "--data.path", str(text_file), "--trainer.max_steps",
            "100000", "--trainer.val_check_interval", "50", "--trainer.log_every_n_steps", "1"]
    for ignored in (False, True):
        folder = tmp_path / ("nohup" if ignored else "tty")
        folder.mkdir()
        last = folder / "checkpoints" / "gpt" / "last.ckpt"
        with (folder / "err.txt").open("w") as err:
            # SIGHUP as a terminal's job gets it, or as nohup leaves it, whatever this runner inherited
            # (a test suite run under nohup would otherwise pass SIG_IGN on to the "terminal" case)
            hup = signal.SIG_IGN if ignored else signal.SIG_DFL
            proc = subprocess.Popen(args, cwd=folder, env=cli_env(), stdout=subprocess.PIPE, stderr=err,
                                    preexec_fn=lambda: signal.signal(signal.SIGHUP, hup))
            wait_for(last, proc)
            proc.send_signal(signal.SIGHUP)
            proc.stdout.close()  # the terminal is gone: writes to stdout now fail (EPIPE)
            if ignored:
                time.sleep(3.0)
                assert proc.poll() is None  # nohup: training goes on
                proc.kill()
                proc.wait(timeout=60)
                continue
            assert proc.wait(timeout=120) == 129
        log = (folder / "err.txt").read_text()
        line = next(line for line in log.splitlines() if line.startswith("gptnano: stopped at step"))
        reached = int(line.split("step ")[1].split(" ")[0])
        assert reached >= 50 and torch.load(last, weights_only=True)["global_step"] == reached


def test_unix_only_calls_stay_behind_their_fallbacks():
    """Nothing in the package reaches for a Unix-only piece except where a portable path stands
    beside it: os.pread in read_at, O_DIRECTORY in fsync_folder; no fcntl (filelock locks), and
    no signal sent to the process itself (Ctrl-C is a flag)."""
    from pathlib import Path

    import gptnano

    allowed = {"os.pread": {"tokens.py"}, "O_DIRECTORY": {"files.py"}}
    found = {}
    for path in Path(gptnano.__file__).parent.rglob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text(encoding="utf-8").splitlines())
        for piece in ("os.pread", "O_DIRECTORY", "import fcntl", "os.kill(", "raise_signal(", "os.killpg("):
            if piece in code and path.name not in allowed.get(piece, ()):
                found.setdefault(piece, []).append(path.name)
    assert found == {}
