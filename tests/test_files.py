"""Writing files without losing any (gptnano/files.py) and the one line format (gptnano/lines.py)."""

import errno
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from gptnano import files, lines
from gptnano.errors import UserError, WriteError


def test_atomic_write_takes_bytes_text_and_a_writer(tmp_path):
    assert files.atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert files.atomic_write(tmp_path / "t.txt", "é\n").read_text(encoding="utf-8") == "é\n"
    files.atomic_write(tmp_path / "s.bin", lambda f: [f.write(bytes([i])) for i in range(3)])
    assert (tmp_path / "s.bin").read_bytes() == b"\x00\x01\x02"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "s.bin", "t.txt"]  # no temporary file left


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = files.atomic_write(tmp_path / "x.json", "old")

    def half_then_fail(f):
        f.write(b"new, half of it")
        raise ValueError("the writer's own error")

    with pytest.raises(ValueError, match="the writer's own error"):
        files.atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_an_os_refusal_is_one_line_naming_the_path_and_what_is_intact(code, tmp_path, monkeypatch):
    """Disk full, read-only, permission denied: injected, since root can write anywhere here."""
    target = files.atomic_write(tmp_path / "last.ckpt", b"previous")
    real_fsync = os.fsync

    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", refuse)
    with pytest.raises(WriteError) as e:
        files.atomic_write(target, b"new")
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    message = str(e.value)
    assert "\n" not in message and str(target) in message and os.strerror(code) in message
    assert errno.errorcode[code] in message and "the previous last.ckpt is intact" in message
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(WriteError, match="no new.bin was written"):
        monkeypatch.setattr(files.os, "fsync", refuse)
        files.atomic_write(tmp_path / "new.bin", b"x")


def test_a_file_where_a_folder_should_be(tmp_path):
    (tmp_path / "checkpoints").write_text("a file, not a folder")
    with pytest.raises(WriteError, match=r"could not write .*checkpoints/run/last\.ckpt: .*no last\.ckpt was written"):
        files.atomic_write(tmp_path / "checkpoints" / "run" / "last.ckpt", b"x")
    with pytest.raises(WriteError, match=r"cannot write checkpoints in .*checkpoints/run: .*nothing was started"):
        files.check_writable_folder(tmp_path / "checkpoints" / "run", "checkpoints")
    assert files.check_writable_folder(tmp_path / "ok" / "run", "logs").is_dir()
    assert list((tmp_path / "ok" / "run").iterdir()) == []  # the probe file is gone


def _hold(path, seconds, started):
    with files.lock(path):
        started.set()
        time.sleep(seconds)


def test_the_lock_makes_a_second_process_wait_and_says_so(tmp_path, capsys):
    path = tmp_path / ".lock"
    started = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(path, 1.0, started))
    holder.start()
    try:
        assert started.wait(30)
        t = time.perf_counter()
        with files.lock(path, "waiting for another process preparing data/prepared"):
            waited = time.perf_counter() - t
    finally:
        holder.join(30)
    assert waited > 0.3
    assert "gptnano: waiting for another process preparing data/prepared" in capsys.readouterr().err
    with files.lock(path, "not printed: nobody holds it"):
        pass
    assert "not printed" not in capsys.readouterr().err


def _hold_forever(path, started):
    with files.lock(path):
        started.set()
        time.sleep(600)


def test_a_busy_lock_can_refuse_at_once_and_dies_with_its_holder(tmp_path):
    """What keeps a comparison to one runner: a held lock refuses in one line instead of waiting,
    and a holder killed outright (SIGKILL: no cleanup runs) releases it, since the lock is the OS's."""
    path = tmp_path / "runner.lock"
    started = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_forever, args=(path, started))
    holder.start()
    try:
        assert started.wait(30)
        t = time.perf_counter()
        with pytest.raises(UserError, match="^held by the other process$"):
            with files.lock(path, busy=lambda: "held by the other process"):
                pass
        assert time.perf_counter() - t < 5  # refused, not waited
    finally:
        holder.kill()
        holder.join(30)
    with files.lock(path, busy=lambda: "not said: its holder is dead"):
        pass


def test_lines_share_one_format_and_width():
    assert lines.line("step 200/1000", "loss 1.8421", "", "21.3k tok/s") == \
        "gptnano: step 200/1000 | loss 1.8421 | 21.3k tok/s"
    long = lines.line("x" * 500)
    assert len(long) == lines.MAX_WIDTH and long.endswith("…")
    assert [lines.duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
    assert lines.steps_field(5, 10) == "step 5/10" and lines.steps_field(5, -1) == "step 5"


def test_no_hand_written_temp_and_rename_left_in_the_package():
    """One writer: nothing else in gptnano renames a file into place."""
    package = Path(files.__file__).parent
    offenders = [p for p in package.rglob("*.py") if p.name != "files.py"
                 and ("os.replace(" in p.read_text() or ".replace(path)" in p.read_text())]
    assert offenders == []


def test_a_probe_left_by_a_killed_process_goes_with_the_next_check(tmp_path):
    """A run killed (SIGKILL) the moment its write check appeared leaves the probe file: the next
    check in that folder removes it with its own, so a resumed run's folder holds no litter."""
    stale = tmp_path / ".gptnano-write-check.99999.tmp"
    stale.write_bytes(b"ok")
    files.check_writable_folder(tmp_path, "checkpoints", create=False)
    assert list(tmp_path.iterdir()) == []


def test_compile_cache_goes_to_the_user_cache_unless_the_variable_says_where(monkeypatch, tmp_path):
    """torch.compile's cache: torch-compile/ in gptnano's per-user cache folder (which a reboot
    keeps), made there; torch's default where no folder can be made or no home found; a
    TORCHINDUCTOR_CACHE_DIR the user set is left alone."""
    monkeypatch.delenv(files.COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
    files.keep_compile_cache()
    assert os.environ[files.COMPILE_CACHE_ENV] == str(tmp_path / "cache" / "torch-compile")
    assert (tmp_path / "cache" / "torch-compile").is_dir()

    monkeypatch.delenv(files.COMPILE_CACHE_ENV)
    monkeypatch.setenv(files.CACHE_ENV, str(files.atomic_write(tmp_path / "a-file", "")))  # no folder there
    files.keep_compile_cache()
    assert files.COMPILE_CACHE_ENV not in os.environ  # torch's default stays, and no error

    monkeypatch.delenv(files.CACHE_ENV)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(files.Path, "home", no_home)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("LOCALAPPDATA", raising=False)
    files.keep_compile_cache()
    assert files.COMPILE_CACHE_ENV not in os.environ

    monkeypatch.setenv(files.COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    files.keep_compile_cache()
    assert os.environ[files.COMPILE_CACHE_ENV] == str(tmp_path / "mine")
