"""The disk says no (issue 19, item 5): every refused write, wherever in the run it happens, is
one `gptnano: error:` line naming the path, the OS's reason and what is intact, exit status 2.
Root can write anywhere here, so the OS errors are real where the OS can give them to root (a
size limit, a file in the way) and injected where it cannot (read-only, disk full)."""

import errno
import os
import resource
from pathlib import Path

import pytest

from gptnano import files
from tests.helpers import TINY_GPT, make_text

FIT = ["fit", *TINY_GPT, "--data.path", "tiny.txt", "--trainer.val_check_interval", "5"]


def _one_error_line(ran) -> str:
    assert ran.returncode == 2, (ran.returncode, ran.stderr[-3000:])
    assert "Traceback" not in ran.stderr, ran.stderr[-3000:]
    last = ran.stderr.strip().splitlines()[-1]
    assert last.startswith("gptnano: error: ") and len(last) <= 400, last
    return last


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "tiny.txt").write_text(make_text(), encoding="utf-8")
    return tmp_path


def test_a_file_size_limit_during_a_checkpoint_write(folder, gptnano):
    """The issue's `ulimit -f` stand-in for a full disk, for real: the OS refuses the checkpoint's
    bytes past the limit (EFBIG). Before: two chained tracebacks ending in torch's `unexpected pos`.
    Tensors larger than Python's write buffer, so that the refusal comes inside torch.save."""
    wide = [*FIT, "--model.net.n_embd", "64"]
    assert gptnano([*wide, "--trainer.max_steps", "5"], folder).returncode == 0
    last = folder / "checkpoints" / "gpt" / "last.ckpt"
    before = last.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        ran = gptnano([*wide, "--trainer.max_steps", "10", "--ckpt_path", "last"], folder)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    line = _one_error_line(ran)
    assert "could not write checkpoints/gpt/" in line and "File too large (EFBIG)" in line, line
    assert "is intact" in line, line
    assert last.read_bytes() == before  # the previous checkpoint is whole
    assert not [p for p in last.parent.iterdir() if p.name.endswith(files.TEMP_SUFFIX)]  # no temp file left


def test_a_read_only_checkpoint_folder_is_found_before_anything_starts(folder, gptnano, monkeypatch):
    """EROFS, injected into gptnano's writes under checkpoints/: refused before the text is even
    prepared (before: after the whole first training stretch, at the first checkpoint)."""
    real_open = open

    def read_only(path, *args, **kwargs):
        if "checkpoints" in str(path) and any(m in str(args[:1]) + str(kwargs) for m in ("w", "a", "x")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    (folder / "checkpoints").mkdir()  # the mount point of a read-only file system
    monkeypatch.setattr(files, "open", read_only, raising=False)
    line = _one_error_line(gptnano([*FIT, "--trainer.max_steps", "5"], folder))
    assert line == ("gptnano: error: cannot write checkpoints in checkpoints/gpt: Read-only file system (EROFS); "
                    "nothing was started"), line
    assert not (folder / "data").exists() and list((folder / "checkpoints").iterdir()) == []


def test_a_file_where_the_log_folder_should_be(folder, gptnano):
    (folder / "lightning_logs").write_text("not a folder")
    line = _one_error_line(gptnano([*FIT, "--trainer.max_steps", "5"], folder))
    assert line.startswith("gptnano: error: cannot write logs in lightning_logs/gpt: Not a directory (ENOTDIR)"), line
    assert not (folder / "checkpoints").exists()


def test_a_full_disk_under_tensorboard_s_writer_thread(folder, gptnano, monkeypatch):
    """ENOSPC injected into TensorBoard's event writes, which run in a thread and raise later in
    Lightning's logging: one line naming the log folder."""
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    line = _one_error_line(gptnano([*FIT, "--trainer.max_steps", "5", "--trainer.log_every_n_steps", "1"], folder))
    assert line.startswith("gptnano: error: could not write lightning_logs/gpt/version_0: No space left on device "
                           "(ENOSPC); "), line


def test_write_errors_are_found_through_library_wrappers():
    """torch.save turns the OS's error into a RuntimeError raised while handling it."""
    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 95488 vs 95380")
    except RuntimeError as e:
        assert files.os_error_in(e).errno == errno.EFBIG
    assert files.os_error_in(RuntimeError("no OS error behind it")) is None
    assert files.os_error_in(FileNotFoundError(errno.ENOENT, "missing")) is None  # not a refused write
    with pytest.raises(RuntimeError, match="a writer's own error"):
        files.atomic_write(Path(os.devnull).parent / "x", lambda f: (_ for _ in ()).throw(RuntimeError("a writer's own error")))
