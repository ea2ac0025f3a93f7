"""Reading a text file: one-line errors for the usual mistakes, strict UTF-8 streamed in
chunks (a character split between two chunks is held back), a progress bar, and the
download of the default corpus. No Lightning, no torch: the tools and the cache use it.

Texts are read as they are, with one exception: a leading UTF-8 byte-order mark (which
Windows editors write) is not a character of the text and is dropped. A UTF-16 file (also
a Windows editor's "Unicode") gets one line saying how to convert it.
"""

import codecs
import hashlib
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gptnano.data.tokenizer import BOM, codepoints
from gptnano.errors import UserError
from gptnano.files import atomic_write

# Text read per step. Small enough that the arrays made from a chunk stay in the CPU's cache
# and the allocator reuses their memory: on the reference machine 256 KiB prepared 100 MB
# faster than 8 MiB did, at a peak resident memory 190 MB lower.
CHUNK_BYTES = 256 << 10
# A prompt is read whole and printed back: bounded, whatever file is named (a model sees only
# its last block_size tokens anyway).
MAX_PROMPT_BYTES = 1 << 20


def check_file(path: Path, what: str = "data file") -> int:
    """The size of a non-empty regular file, or one line that says what is wrong with it."""
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{what} is empty: {path}")
    return size


def not_utf8(path: Path, offset: int, bad: bytes, hint: str = "", head: bytes = b"") -> UserError:
    """The error for a file that is not UTF-8; ``head`` (its first bytes) tells a UTF-16 one apart."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        byte = "; or train on its bytes with --data.tokenizer byte" if hint else ""
        return UserError(f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark): save it as UTF-8 "
                         f"(e.g. iconv -f UTF-16 -t UTF-8){byte}")
    return UserError(f"{path} is not valid UTF-8 (byte offset {offset}: {bad!r}){hint}")


def read_text(path: Path, what: str = "data file") -> str:
    """A whole small UTF-8 file (a prompt), with one-line errors for the usual mistakes."""
    size = check_file(path, what)
    if size > MAX_PROMPT_BYTES:
        raise UserError(f"{what} {path} has {size:,} bytes: a prompt is at most {MAX_PROMPT_BYTES:,} "
                        "(the model sees only its last block_size tokens)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"could not read {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e.start, raw[e.start:e.start + 1], head=raw[:2]) from None


@contextmanager
def progress(path: Path, what: str, verbose: bool):
    """A progress bar in MB/s on a terminal while ``path`` is read, and one line on stderr
    at the end: "gptnano: <what>: <MB> in <s> (<MB/s>)"."""
    from tqdm import tqdm  # a Lightning dependency

    size = path.stat().st_size
    start = time.perf_counter()
    with tqdm(total=size, desc=what.split()[0], unit="B", unit_scale=True, file=sys.stderr,
              disable=None if verbose else True, leave=False) as bar:
        yield bar
    if verbose:
        seconds = time.perf_counter() - start
        print(f"gptnano: {what}: {size / 1e6:.1f} MB in {seconds:.2f} s ({size / 1e6 / max(seconds, 1e-9):.0f} MB/s)",
              file=sys.stderr)


def read_units(path: Path, kind: str, bar) -> Iterator[tuple[bytes, np.ndarray]]:
    """The file chunk by chunk as ``(raw bytes, units)``: the units are the bytes themselves
    (kind "byte") or the code points of the characters they complete (kind "char": strict
    UTF-8, a character split between two chunks is held back until its last byte)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict") if kind == "char" else None
    offset, head = 0, b""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"could not read {path}: {e.strerror or e}") from None
    with f:
        while True:
            raw = f.read(CHUNK_BYTES)
            head = head or raw[:2]
            if decoder is None:
                if not raw:
                    return
                yield raw, np.frombuffer(raw, dtype=np.uint8)
            else:
                text = _decode(decoder, raw, offset, path, head)
                yield raw, codepoints(text.removeprefix(BOM) if offset == 0 else text)  # a leading BOM is no character
                if not raw:
                    return
            offset += len(raw)
            bar.update(len(raw))


def _decode(decoder, raw: bytes, offset: int, path: Path, head: bytes) -> str:
    held = len(decoder.getstate()[0])  # bytes of an unfinished character from the previous chunk
    try:
        return decoder.decode(raw, final=not raw)
    except UnicodeDecodeError as e:
        hint = "; --data.tokenizer byte trains on any file's bytes"
        raise not_utf8(path, offset - held + e.start, e.object[e.start:e.start + 1], hint, head) from None


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` through ``atomic_write``: checked (length, sha256) before the rename.

    A network failure or a wrong checksum raises UserError naming the URL; a failed write a
    WriteError naming ``dest``. Either way no file is left behind.
    """
    hint = "pass a local text file with --data.path (or set GPTNANO_DATA)"

    def failed(e: Exception) -> UserError:
        if isinstance(e, urllib.error.HTTPError):
            return UserError(f"could not download {url}: HTTP {e.code} {e.reason}; {hint}")
        return UserError(f"could not download {url}: {getattr(e, 'reason', e)}; {hint}")

    def fetch(f) -> None:
        digest, size = hashlib.sha256(), 0
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise failed(e) from None
        with response:
            expected = response.headers.get("Content-Length")
            while True:
                try:
                    chunk = response.read(1 << 16)
                except (OSError, ValueError) as e:
                    raise failed(e) from None
                if not chunk:
                    break
                f.write(chunk)  # an OSError here is the disk's: atomic_write names dest
                digest.update(chunk)
                size += len(chunk)
        if expected is not None and size != int(expected):
            raise UserError(f"download of {url} was truncated ({size} of {expected} bytes); {hint}")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise UserError(f"checksum mismatch for {url} (sha256 {digest.hexdigest()}, expected {sha256}); {hint}")

    return atomic_write(dest, fetch)
