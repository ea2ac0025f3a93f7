"""Writing files so that nothing is lost: one atomic writer, one lock, one check of a folder.

Every file gptnano writes (checkpoints, the prepared corpus and its metadata, downloads,
exports, results) goes through ``atomic_write``: a temporary file in the target's own
folder, flushed to disk, renamed over the target, and the folder's entry flushed too.
A rename within one file system is atomic, so a process killed at any moment leaves the
old file or the new one, never half of one. (A temporary file elsewhere, e.g. in /tmp,
would be *copied* over on a rename across file systems, which a kill can cut in half.)

A failed write (disk full, read-only file system, permission denied, a path that is a
file where a folder is needed) is a ``WriteError``: one line naming the path and the
OS's reason, and what is intact.

And gptnano's per-user cache folder (``cache_folder``), where torch.compile's cache is kept
between runs (``keep_compile_cache``). No Lightning, no torch.
"""

import errno
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from gptnano.errors import UserError, WriteError

TEMP_SUFFIX = ".tmp"
CACHE_ENV = "GPTNANO_CACHE_DIR"  # gptnano's per-user cache folder (default: the OS's, see cache_folder)
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch.compile's on-disk cache (PyTorch's recipe "Compile Time Caching")


def cache_folder() -> Path:
    """gptnano's per-user cache folder (remembered device verdicts, torch.compile's cache):
    ``$GPTNANO_CACHE_DIR``, else the OS's per-user cache folder (``$XDG_CACHE_HOME/gptnano`` or
    ``~/.cache/gptnano``, ``~/Library/Caches/gptnano``, ``%LOCALAPPDATA%\\gptnano\\Cache``).

    Raises:
        RuntimeError: no home folder can be found (``Path.home``).
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "gptnano" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "gptnano"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "gptnano"


def keep_compile_cache() -> None:
    """Keep what torch.compile compiles where later runs find it, after a reboot too: unless
    ``TORCHINDUCTOR_CACHE_DIR`` is set, it becomes ``torch-compile`` in gptnano's per-user cache
    folder (``cache_folder``) instead of torch's default in the temporary folder, which many systems
    empty at boot. The `gptnano` command calls it first: importing Lightning fixes torch's default in
    the variable (torch makes that folder as it imports), and every process the command starts
    (DDP's, compare's runs) inherits the variable. Best effort: where the folder cannot be made (no
    home, a read-only one, a full disk), torch's default stays and nothing is said."""
    if COMPILE_CACHE_ENV in os.environ:
        return
    try:
        folder = cache_folder() / "torch-compile"
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):
        return
    os.environ[COMPILE_CACHE_ENV] = str(folder)


def _reason(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    return f"{e.strerror or e}" + (f" ({name})" if name else "")


# What a refused write looks like to the OS: disk full (or over quota, or over a size limit),
# read-only, permission denied, a file where a folder is needed (or the other way round).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR}


def os_error_in(e: BaseException | None) -> OSError | None:
    """The OSError of a refused write that ``e`` is or was raised from (``__cause__`` or
    ``__context__``, at any depth), or None. Writers deep in a library often turn the OS's error
    into their own: torch.save's is a RuntimeError ("unexpected pos ...") raised while handling it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def shown_path(path: Path | str) -> str:
    """A path as the user would type it: relative to the current folder when it is inside it."""
    try:
        if Path(path).resolve().is_relative_to(Path.cwd().resolve()):
            return os.path.relpath(path)
    except (OSError, ValueError):  # no current folder any more; another drive (Windows)
        pass
    return str(path)


def write_error(path: Path | str, e: OSError, intact: str) -> WriteError:
    """The one-line error for an OS error ``e`` while writing ``path``; ``intact`` says what survived."""
    return WriteError(f"could not write {shown_path(path)}: {_reason(e)}; {intact}")


def temp_path(path: Path) -> Path:
    """Where ``atomic_write`` writes ``path`` before the rename: beside it, named after the process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows has no folder handles to flush)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (network mounts) cannot flush a folder: the rename still happened
    finally:
        os.close(fd)


def atomic_write(path: Path | str, content: bytes | str | Callable[[BinaryIO], None], *,
                 remove_stale: bool = False) -> Path:
    """Write ``content`` to ``path`` atomically and durably; returns ``path``.

    Args:
        path: The file to write; its folder is created if needed.
        content: bytes, a str (written as UTF-8), or a function that writes into the open
            binary file (for streamed writes: a checkpoint, a prepared corpus). An exception
            it raises aborts the write: the temporary file is removed and ``path`` untouched.
        remove_stale: Also delete temporary files of ``path`` left by processes killed mid-write.

    Raises:
        WriteError: the OS refused (disk full, read-only, permissions, a file where a folder
            should be); the message names the path and says that the previous file is intact.
    """
    path = Path(path)
    intact = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        refused = e if isinstance(e, OSError) else os_error_in(e)  # torch.save's RuntimeError over the OS's
        if refused is None:
            raise
        raise write_error(path, refused, intact) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    if remove_stale:
        for stale in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
    fsync_folder(path.parent)
    return path


PROBE = ".gptnano-write-check"  # the file check_writable_folder writes and removes


def check_writable_folder(folder: Path | str, what: str, create: bool = True) -> Path:
    """Prove a file can be written in ``folder`` before any work that would be lost if it could not
    (the first training step, say); ``what`` names its use. With ``create`` the folder is made if
    needed; without, nothing is left behind: a missing folder is probed in its nearest existing
    parent (a file there where a folder is needed is refused as the OS would refuse it).

    Raises:
        WriteError: one line naming the folder, the OS's reason and that nothing was started.
    """
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        where = folder
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(where))
        probe = where / f"{PROBE}.{os.getpid()}{TEMP_SUFFIX}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        # A probe of a process killed before it could remove its own (SIGKILL the moment it appeared) goes
        # with this one; missing_ok, since another process's check may have taken this one already.
        for stale in where.glob(f"{PROBE}.*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
    except OSError as e:
        raise WriteError(f"cannot write {what} in {shown_path(folder)}: {_reason(e)}; nothing was started") from None
    return folder


@contextmanager
def lock(path: Path | str, waiting: str | None = None, busy: Callable[[], str] | None = None):
    """Hold an exclusive lock on ``path`` (a lock file, created if needed) across processes and
    operating systems, for as long as the ``with`` block runs. If another process holds it, print
    ``waiting`` (when given) once on stderr, then wait; or, given ``busy``, refuse at once with the
    UserError ``busy()`` says. The lock is the operating system's: it goes with the process holding
    it, however that process ends (even by SIGKILL), so a dead holder never blocks the next one.
    Written by hand nowhere: ``filelock`` does this well on every OS (fcntl on POSIX, msvcrt on
    Windows)."""
    from filelock import FileLock, Timeout

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e, "nothing was written") from None
    held = FileLock(str(path))
    try:
        try:
            held.acquire(timeout=0)
        except Timeout:
            if busy:
                raise UserError(busy()) from None
            if waiting:
                print(f"gptnano: {waiting}", file=sys.stderr)
            held.acquire()
    except OSError as e:
        raise write_error(path, e, "nothing was written") from None
    try:
        yield
    finally:
        held.release()
