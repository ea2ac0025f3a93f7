"""The text: getting it, the character tokenizer, the splits and the batches.

Training windows are a pure function of (seed, step, rank): no sampler state,
so a run resumed from a checkpoint draws exactly the batches it would have
drawn, and DDP ranks draw different ones. Validation is one deterministic pass
over the whole validation split.
"""

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from gptnano.errors import UserError
from gptnano.tokenizer import CharTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_CACHE = Path("data") / "tinyshakespeare" / "input.txt"


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically: a temp file beside it, checked, then renamed.

    Any failure raises UserError naming the URL and leaves no file behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    hint = "pass a local text file with --data.path (or set GPTNANO_DATA)"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            expected = response.headers.get("Content-Length")
            size = 0
            while chunk := response.read(1 << 16):
                f.write(chunk)
                size += len(chunk)
        if expected is not None and size != int(expected):
            raise UserError(f"download of {url} was truncated ({size} of {expected} bytes); {hint}")
        if sha256 is not None:
            got = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if got != sha256:
                raise UserError(f"checksum mismatch for {url} (sha256 {got}, expected {sha256}); {hint}")
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise UserError(f"could not download {url}: HTTP {e.code} {e.reason}; {hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download {url}: {reason}; {hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def read_text(path: Path) -> str:
    """Read a UTF-8 text file, with one-line errors for the usual mistakes."""
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():
        raise UserError(f"data path is not a file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (byte offset {e.start}: {raw[e.start:e.start + 1]!r})") from None
    if not text:
        raise UserError(f"data file is empty: {path}")
    return text


class TrainWindows(IterableDataset):
    """An endless stream of training batches ``(x, y)`` of shape ``[batch_size, block_size]``.

    Batch number ``s`` is drawn from a generator seeded by ``(seed, s, rank)``,
    and iteration starts at ``start()`` (the trainer's step), so resuming a run
    continues the very same stream of batches.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int, rank: int, start):
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed, self.rank, self.start = seed, rank, start

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A tuple of ints hashes the same in every process (no hash randomisation).
        g = torch.Generator().manual_seed(hash((self.seed, step, self.rank)) % 2**63)
        starts = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=g)
        rows = self.data[starts[:, None] + torch.arange(self.block_size + 1)]  # (B, T+1), no Python loop
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self):
        step = self.start()
        while True:
            yield self.batch(step)
            step += 1


class EvalWindows(IterableDataset):
    """One deterministic pass over a split in non-overlapping windows.

    Every character after the first is predicted exactly once: the last window
    is aligned to the end of the split and its already-scored targets are
    masked with -100 (ignored by the loss). With ``world_size > 1`` rank r
    takes windows r, r + world, ...: no window is repeated or dropped, so a
    token-weighted mean over ranks equals the single-process loss.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, rank: int = 0, world_size: int = 1):
        n_targets = len(data) - 1
        self.starts = list(range(0, n_targets - block_size + 1, block_size))
        self.tail = n_targets - len(self.starts) * block_size  # targets not covered by full windows
        if self.tail:
            self.starts.append(n_targets - block_size)
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        mine = torch.tensor(self.starts[self.rank :: self.world_size], dtype=torch.long)
        last = self.starts[-1]
        for chunk in mine.split(self.batch_size):
            rows = self.data[chunk[:, None] + torch.arange(self.block_size + 1)]
            x, y = rows[:, :-1], rows[:, 1:].clone()
            if self.tail:
                y[chunk == last, : self.block_size - self.tail] = -100  # scored by the previous window
            yield x, y


class ShakespeareDataModule(L.LightningDataModule):
    """Character-level text: tiny Shakespeare by default, or any UTF-8 file.

    Args:
        path: A local UTF-8 text file to train on. When empty, the environment
            variable GPTNANO_DATA is used, and when that is unset too, tiny
            Shakespeare is downloaded once (checksum-verified) into data/.
        batch_size: Training windows per step (per device).
        eval_batch_size: Windows per validation/test batch.
        val_fraction: Fraction of the text, after the training part, used for validation.
        test_fraction: Fraction carved from the end of the text for `gptnano test` (0: no test split).
        seed: Seed of the training-window stream (windows depend on seed, step and rank only).
        vocab: The vocabulary as one string of characters. Normally derived from the text,
            or restored from the checkpoint given with --ckpt_path; set it only to
            force a fixed vocabulary.
        prompt: Prompt for `gptnano predict`, or a list of prompts; one sample is generated per prompt.
        prompt_file: A UTF-8 file whose whole content is one more prompt for `gptnano predict`.
        url: Where the default corpus is downloaded from.
    """

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 12,
        eval_batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        seed: int = 1337,
        vocab: str | None = None,
        prompt: str | list[str] | None = None,
        prompt_file: str | None = None,
        url: str = SHAKESPEARE_URL,
    ):
        super().__init__()
        if batch_size <= 0 or eval_batch_size <= 0:
            raise UserError("batch sizes must be positive")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError("need 0 < val_fraction, 0 <= test_fraction and val_fraction + test_fraction < 1")
        self.path = path or os.environ.get("GPTNANO_DATA") or None
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        self.prompt_file, self.url = prompt_file, url
        self._text: str | None = None
        # vocab_size must be known now, before the model is built (it is linked into it).
        self.tokenizer = CharTokenizer(vocab) if vocab else CharTokenizer.from_text(self.text)
        self.block_size: int | None = None  # taken from the model in setup()

    @property
    def vocab(self) -> str:
        return self.tokenizer.vocab

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def text_path(self) -> Path:
        return Path(self.path) if self.path else DEFAULT_CACHE

    def prepare_data(self) -> None:
        if self.trainer is not None and self.trainer.state.fn == "predict":
            return  # predicting needs only the checkpoint (and its vocabulary)
        if not self.path and not DEFAULT_CACHE.exists():
            download(self.url, DEFAULT_CACHE, SHAKESPEARE_SHA256)

    @property
    def text(self) -> str:
        if self._text is None:
            self.prepare_data()
            self._text = read_text(self.text_path)
        return self._text

    def split_bounds(self, n: int) -> tuple[int, int]:
        """End of train and end of validation: train | val | test, contiguous."""
        return int(n * (1 - self.val_fraction - self.test_fraction)), int(n * (1 - self.test_fraction))

    def setup(self, stage: str) -> None:
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None:
            self.block_size = model.net.block_size
        if stage == "predict":
            return
        missing = self.tokenizer.unknown(self.text)
        if missing:
            shown = "".join(missing[:20])
            raise UserError(f"{self.text_path} has {len(missing)} characters not in the model's vocabulary ({shown!r}): "
                            "the checkpoint was trained on a different text")
        data = self.tokenizer.encode(self.text)
        a, b = self.split_bounds(len(data))
        self.splits = {"train": data[:a], "val": data[a:b], "test": data[b:]}
        need = self.block_size + 1
        for name in ("train", "val") + (("test",) if self.test_fraction > 0 else ()):
            if len(self.splits[name]) < need:
                raise UserError(f"the {name} split of {self.text_path} has {len(self.splits[name])} characters, "
                                f"fewer than block_size + 1 = {need}: use a longer text or a smaller block_size")

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        start = (lambda: self.trainer.global_step * accumulate) if self.trainer is not None else (lambda: 0)
        ds = TrainWindows(self.splits["train"], self.block_size, self.batch_size, self.seed, rank, start)
        return DataLoader(ds, batch_size=None)

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._rank()
        return DataLoader(EvalWindows(self.splits[split], self.block_size, self.eval_batch_size, rank, world), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        if self.test_fraction <= 0:
            raise UserError("no test split: set --data.test_fraction (e.g. 0.05) to carve one from the end of the text")
        return self._eval_loader("test")

    def prompt_texts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompt_file:
            prompts.append(read_text(Path(self.prompt_file)))
        return prompts or ["\n"]

    def predict_dataloader(self) -> DataLoader:
        encoded = [(i, self.tokenizer.encode(p)[None, :]) for i, p in enumerate(self.prompt_texts())]
        return DataLoader(encoded, batch_size=None)
