"""A text file's token ids on disk: prepared once, then read in place by every run and rank.

The first run on a text streams it twice in small chunks: a *scan* (content
hash, length, distinct characters = the vocabulary) and an *encode* pass that
writes the ids to ``data/prepared/<hash>-<tokenizer>.bin`` in the smallest
dtype that holds the vocabulary, with a small JSON of metadata beside it. Later
runs, and every DDP rank, only open that file and read the windows they need
(``Tokens``): memory does not grow with the corpus, only the page cache does.
(nanoGPT's ``prepare.py`` writes ``train.bin`` / ``val.bin`` by hand and maps
them with ``np.memmap``; here preparing happens on first use, and reads are
``pread`` calls, for the reason given in ``Tokens``.)

Nothing on disk is trusted blindly. What a scan found is remembered per text
file (``sources/``) together with the file's size, inode and modification and
change times; any write to the text changes one of them, and the text is then
scanned again. A cache is used only if its metadata names the same text hash,
tokenizer and vocabulary, its size is right and its ids have the CRC-32
recorded when they were written (checked again whenever the file's stat shows
a write since the last check); otherwise it is rebuilt. Files appear only by
atomic rename, so a crash leaves the old state or the new, never half a file;
a lock makes one process build while the others wait for it.

This module has no Lightning in it: the data module decides when to call it.
"""

import dataclasses
import hashlib
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gptnano.data.text import CHUNK_BYTES, check_file, progress, read_units
from gptnano.data.tokenizer import N_CODEPOINTS
from gptnano.data.tokens import Tokens
from gptnano.errors import UserError, WriteError
from gptnano.files import atomic_write, lock

CACHE_DIR = Path("data") / "prepared"
FORMAT = 1  # bump when the files' layout changes: older caches are then rebuilt, not misread
# A file written this shortly before it was scanned may be written again within the same
# timestamp tick, leaving its stat unchanged: such a scan is not remembered ("racy git").
RACY_NS = 2_000_000_000
UNITS = {"char": N_CODEPOINTS, "byte": 256}  # how many distinct units each tokenizer kind can see


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise UserError(f"a vocabulary of {vocab_size} tokens does not fit 32-bit ids")


# ----- what a text is made of --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scan:
    """What one pass over a text found: all that is needed before encoding it."""

    sha256: str  # of the file's bytes: the cache key
    n_tokens: int  # characters (kind "char") or bytes (kind "byte")
    units: str  # the distinct units in order, one character each (bytes as U+0000..U+00FF):
    #             for kind "char" this is the text's own vocabulary
    scanned_at: int  # time.time_ns() when the pass began


def scan(path: Path, kind: str, verbose: bool = True) -> Scan:
    """Read a text once, streamed: its hash, its length in units and its distinct units."""
    started = time.time_ns()
    digest = hashlib.sha256()
    seen = np.zeros(UNITS[kind], dtype=bool)
    n = 0
    with progress(path, f"scanned {path}", verbose) as bar:
        for raw, units in read_units(path, kind, bar):
            digest.update(raw)
            seen[units] = True  # a scatter: ~300 MB/s, no Python loop per character
            n += len(units)
    distinct = np.flatnonzero(seen).astype(np.uint32)
    return Scan(digest.hexdigest(), n, distinct.tobytes().decode("utf-32-le"), started)


# ----- the prepared ids ---------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    """Token ids of a text, opened read-only, and the metadata they were written with."""

    ids: Tokens
    meta: dict
    path: Path
    built: bool  # True when this process wrote it, False when an existing cache was reused


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, ensure_ascii=False))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_stat(path: Path) -> list[int]:
    """What changes whenever a file is written: size, modification and change time, inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def unchanged_since(stat: list[int], recorded: list[int] | None, looked_at: int) -> bool:
    """Whether a file whose ``stat`` is now as ``recorded`` when its content was read at
    ``looked_at`` (time.time_ns) still has that content. The change time moves with any
    write and cannot be set back; a file changed shortly before it was read could change
    again within the same timestamp tick, so its stat proves nothing (RACY_NS)."""
    return stat == recorded and stat[2] < looked_at - RACY_NS


def file_crc32(path: Path) -> int:
    """CRC-32 of a file, read in chunks through one buffer (~4 GB/s, no memory growth)."""
    crc, buf = 0, bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


class Corpus:
    """One text file and its prepared token ids under ``cache_dir``.

    ``scan()`` reads the text at most once per process and writes nothing;
    ``prepare()`` checks, then opens the ids, building them first if no valid cache
    exists. Every write happens in ``prepare`` after all checks have passed.
    """

    def __init__(self, path: Path, kind: str, cache_dir: Path = CACHE_DIR):
        if kind not in UNITS:
            raise UserError(f"unknown tokenizer {kind!r}: choose one of {', '.join(UNITS)}")
        self.path, self.kind, self.cache_dir = Path(path), kind, Path(cache_dir)
        self._scan: Scan | None = None
        self._scan_stat: list[int] | None = None

    # The scan is remembered per file, keyed by what changes whenever the file is written.
    def _stat(self) -> list[int]:
        return file_stat(self.path)

    @property
    def _memo(self) -> Path:
        name = hashlib.sha256(str(self.path.resolve()).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return self.cache_dir / "sources" / f"{name}-{self.kind}.json"

    def scan(self, verbose: bool = True) -> Scan:
        """What the text is made of: remembered from an earlier run if the file has not
        been written since, else one streamed pass. Writes nothing."""
        check_file(self.path)
        stat = self._stat()  # taken before reading: a write during the scan makes it stale
        if self._scan is None or self._scan_stat != stat:
            self._scan = self._remembered(stat) or scan(self.path, self.kind, verbose)
            self._scan_stat = stat
        return self._scan

    def _remembered(self, stat: list[int]) -> Scan | None:
        memo = _read_json(self._memo)
        if memo is None or memo.get("format") != FORMAT:
            return None
        try:
            remembered = Scan(str(memo["sha256"]), int(memo["n_tokens"]), str(memo["units"]), int(memo["scanned_at"]))
        except (KeyError, TypeError, ValueError):
            return None
        if "\ufeff" in remembered.units and memo.get("lead_bom") != "dropped":
            return None  # scanned before a leading byte-order mark was dropped: scan again
        return remembered if unchanged_since(stat, memo.get("stat"), remembered.scanned_at) else None

    def _remember(self) -> None:
        memo = {"format": FORMAT, "path": str(self.path.resolve()), "stat": self._scan_stat, "lead_bom": "dropped",
                **dataclasses.asdict(self._scan)}
        if _read_json(self._memo) != memo:
            try:
                self._memo.parent.mkdir(parents=True, exist_ok=True)
                _write_json(self._memo, memo)
            except (OSError, WriteError):
                pass  # a read-only cache folder: the text is scanned again next time

    def check(self, tokenizer, verbose: bool = True) -> Scan:
        """Refuse a text that cannot be trained or scored with ``tokenizer``."""
        facts = self.scan(verbose)
        if len(facts.units) == 1:
            what = "character" if self.kind == "char" else "byte"
            raise UserError(f"{self.path} is one {what} repeated ({facts.units!r} x {facts.n_tokens}): "
                            "there is nothing to learn from it")
        if self.kind == "char":
            missing = sorted(set(facts.units) - set(tokenizer.vocab))
            if missing:
                shown = "".join(missing[:20])
                raise UserError(f"{self.path} has {len(missing)} characters not in the model's vocabulary "
                                f"({shown!r}): the checkpoint was trained on a different text (fit --init_from "
                                "starts a new run from it that learns them)")
        return facts

    def _stem(self, facts: Scan, tokenizer) -> str:
        # Ids depend on the text and the tokenizer's vocabulary: a vocabulary other than
        # the text's own (a checkpoint's, say) gets its own file.
        tag = self.kind
        if self.kind == "char" and tokenizer.vocab != facts.units:
            tag += "-" + hashlib.sha256(tokenizer.vocab.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        return f"{facts.sha256[:16]}-{tag}"

    def _open(self, stem: str, facts: Scan, tokenizer) -> Prepared | None:
        """The cache ``stem`` if it is exactly the ids of this text and tokenizer, else None."""
        bin_path = self.cache_dir / f"{stem}.bin"
        meta = _read_json(self.cache_dir / f"{stem}.json")
        expected = {"format": FORMAT, "sha256": facts.sha256, "kind": tokenizer.kind, "vocab": tokenizer.vocab,
                    "n_tokens": facts.n_tokens, "dtype": dtype_for(len(tokenizer)).name}
        if meta is None or any(meta.get(k) != v for k, v in expected.items()):
            return None
        try:
            stat = file_stat(bin_path)
            if stat[0] != facts.n_tokens * np.dtype(meta["dtype"]).itemsize:
                return None  # truncated (or padded)
            verified = meta.get("verified") or {}
            if not unchanged_since(stat, verified.get("stat"), verified.get("at", 0)):
                # Written (or touched) since its CRC was last checked: check it now (~3 GB/s),
                # and remember that, so that later starts only compare the stat.
                if file_crc32(bin_path) != meta.get("crc32"):
                    return None
                self._write_meta(stem, {**meta, "verified": {"stat": stat, "at": time.time_ns()}})
        except OSError:
            return None
        return Prepared(Tokens(bin_path, meta["dtype"]), meta, bin_path, built=False)

    def _write_meta(self, stem: str, meta: dict) -> None:
        try:
            _write_json(self.cache_dir / f"{stem}.json", meta)
        except (OSError, WriteError):
            pass  # a read-only cache: it is checked again next time

    def _build(self, stem: str, facts: Scan, tokenizer) -> Prepared:
        """Encode the text chunk by chunk into ``stem.bin`` (temp file, fsync, rename), then
        write its metadata (last: a .bin without matching metadata is never used).
        Whichever process builds says so on stderr."""
        dtype = dtype_for(len(tokenizer))
        bin_path = self.cache_dir / f"{stem}.bin"
        digest, crc = hashlib.sha256(), 0

        def encode(f) -> None:
            nonlocal crc
            with progress(self.path, f"tokenized {self.path} into {bin_path}", verbose=True) as bar:
                for raw, units in read_units(self.path, self.kind, bar):
                    digest.update(raw)
                    ids = tokenizer.encode_units(units)
                    if ids.dtype.kind == "i" and len(ids) and ids.min() < 0:  # -1: outside the vocabulary
                        raise UserError(f"{self.path} changed while it was being prepared: run again")
                    ids = ids.astype(dtype, copy=False)
                    crc = zlib.crc32(ids, crc)
                    f.write(ids)
            if digest.hexdigest() != facts.sha256:
                raise UserError(f"{self.path} changed while it was being prepared: run again")

        atomic_write(bin_path, encode)
        meta = {"format": FORMAT, "sha256": facts.sha256, "kind": tokenizer.kind, "vocab": tokenizer.vocab,
                "n_tokens": facts.n_tokens, "dtype": dtype.name, "crc32": crc,
                "source": str(self.path.resolve()), "n_bytes": self.path.stat().st_size}
        _write_json(self.cache_dir / f"{stem}.json", meta)
        return Prepared(Tokens(bin_path, dtype), meta, bin_path, built=True)

    def prepare(self, tokenizer, check: Callable[[int], None] | None = None, verbose: bool = True) -> Prepared:
        """The text's ids under ``tokenizer``, opened for reading: a valid cache if there is one,
        else built now. ``check(n_tokens)`` may refuse the text before anything is written."""
        if tokenizer.kind != self.kind:
            raise ValueError(f"a {tokenizer.kind} tokenizer for a corpus of {self.kind} units")
        facts = self.check(tokenizer, verbose)
        if check is not None:
            check(facts.n_tokens)
        stem = self._stem(facts, tokenizer)
        found = self._open(stem, facts, tokenizer)
        if found is None:
            try:
                with lock(self.cache_dir / ".lock", f"waiting for another process preparing {self.cache_dir}"
                          if verbose else None):
                    found = self._open(stem, facts, tokenizer) or self._build(stem, facts, tokenizer)
            except OSError as e:
                raise UserError(f"could not prepare {self.path} in {self.cache_dir}: {e.strerror or e}") from None
        self._remember()
        return found


def run_text(recorded: dict | None, asked: str | None, kind: str, default: Path, default_sha256: str) -> tuple[str | None, str]:
    """The text a command on a checkpoint reads, and the line to say about it ("" for none).

    Args:
        recorded: The checkpoint's record of its text, ``{"path", "sha256"}`` (None: a checkpoint
            written before texts were recorded, which reads ``asked``).
        asked: A path given on this command (typed, or from a config file given), or None.
        kind: The tokenizer's kind ("char" or "byte"), which the scan reads the file as.
        default, default_sha256: The default corpus's cache file and checksum: a run on it that
            moved to another machine reads (or downloads) it there.

    Returns:
        (the path to read, a line to print or ""). The run's own text when nothing is asked, whatever
        GPTNANO_DATA says; an asked path always, with a line when it is not the text the run trained on.

    Raises:
        UserError: the run's text is not there any more, or changed since (sha256), and no path was asked.
    """
    if not recorded:
        return asked, ""
    path, sha = recorded["path"], recorded["sha256"]
    if asked and Path(asked).resolve() != Path(path):
        other = Corpus(Path(asked), kind).scan(verbose=False).sha256 != sha
        return asked, f"gptnano: reading {asked}, not the text the run was trained on ({path}, sha256 {sha[:12]}...)" \
            if other else ""
    if Path(path).is_file():
        now = Corpus(Path(path), kind).scan(verbose=False).sha256
        if now != sha and not asked:
            raise UserError(f"the run's text {path} has changed since it was trained on (sha256 {sha[:12]}... then, "
                            f"{now[:12]}... now): give --data.path {path} to go on with it as it is")
        return path, ""
    if sha == default_sha256:
        return str(default), ""  # downloaded again where it is missing
    raise UserError(f"the run's text {path} is not there (a run moved to another machine?): give --data.path FILE "
                    f"(the run's text has sha256 {sha[:12]}...)")
