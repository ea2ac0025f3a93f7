"""ShakespeareDataModule: the text as Lightning sees it. Getting it, its tokenizer, the
splits and the batches.

The text is tokenised once into a cache file (gptnano/data/cache.py) that every run
and rank reads windows from (gptnano/data/windows.py). This is the one module of
``gptnano/data`` that imports Lightning.
"""

import os
import sys
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from gptnano.data.cache import Corpus, Prepared
from gptnano.data.text import download, read_text
from gptnano.data.tokenizer import TOKENIZERS, CharTokenizer, as_prompt, default_prompt, make_tokenizer
from gptnano.data.windows import EvalWindows, TrainWindows, epoch_length
from gptnano.errors import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_CACHE = Path("data") / "tinyshakespeare" / "input.txt"
# Validation by default: a full pass over a split of up to FULL_PASS_TOKENS tokens (tiny
# Shakespeare's has 111,540: its published numbers are full passes), and DEFAULT_VAL_TOKENS
# evenly spread over a larger one, so that a validation costs seconds however big the text
# (a full pass over a 300 MB text's split took ~3 minutes on the reference CPU, at every validation).
FULL_PASS_TOKENS = 2_000_000
DEFAULT_VAL_TOKENS = 1_000_000


def check_splits(saved: dict, asked: dict, subcommand: str) -> None:
    """Refuse evaluating on text the run trained on: a validation split reaching into the run's
    training split, or a test split the run did not hold out. ``saved`` and ``asked`` are the
    ``data`` settings (fractions); the splits are contiguous (train | val | test), so the fractions decide.

    Raises:
        UserError: naming the fraction and the split it would reach into.
    """
    v, t = saved.get("val_fraction", 0.1), saved.get("test_fraction", 0.0)
    v2, t2 = asked.get("val_fraction", 0.1), asked.get("test_fraction", 0.0)
    if subcommand == "test" and (t2 > t + 1e-12 or t == 0):
        held = f"held out the last {t:g} of the text" if t else "held out no test split"
        raise UserError(f"--data.test_fraction {t2:g}: the run {held}, so this test split would score text it "
                        "trained or validated on; test with --data.test_fraction at most the run's")
    if subcommand == "validate" and v2 + t2 > v + t + 1e-12:
        raise UserError(f"--data.val_fraction {v2:g} (with test_fraction {t2:g}) reaches into the text this run "
                        f"trained on (its validation split is the {v + t:g} after training): score at most that")


class WindowLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable (its ``state_dict`` / ``load_state_dict``
    interface): the windows are a pure function of the run's global batch index, which the
    checkpoint's step restores, so there is no state of its own to keep."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore: the stream goes on from the restored step (``TrainWindows``)."""


def _rank_zero() -> bool:
    return rank_zero_only.rank == 0  # from the launcher's environment, valid before the Trainer exists


class ShakespeareDataModule(L.LightningDataModule):
    """Character-level text: tiny Shakespeare by default, or any UTF-8 file (any file with bytes).

    The text is tokenised once into ``data/prepared/`` and read from there by every
    later run and every DDP rank (see gptnano/data/cache.py), so memory does not grow
    with the corpus.

    Args:
        path: A local UTF-8 text file to train on (any file with --data.tokenizer byte). It is
            tokenised once into data/prepared/ and read from there. When empty, the environment
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
        prompt: Prompt for `gptnano predict`, or a list of prompts; one sample is generated per prompt
            (default: a newline, or the vocabulary's first character if the text has no newline).
        prompt_file: A UTF-8 file whose whole content is one more prompt for `gptnano predict` (at most
            1 MB; a byte-order mark is dropped, and Windows line ends become newlines when the model
            knows no '\\r').
        url: Where the default corpus is downloaded from.
        tokenizer: "char": one token per character, the vocabulary being the text's characters
            (the default). "byte": one token per UTF-8 byte, 256 of them, for any file whatever
            its characters (the way enwik8 is reported: val/bpc is then bits per byte).
        val_tokens: Tokens scored at each validation: ceil(val_tokens / block_size) windows spread
            evenly over the validation split, the same ones every time; "all" scores the whole
            split. Default: the whole split up to 2,000,000 tokens (tiny Shakespeare's is 111,540),
            1,000,000 evenly spread beyond that, so a validation stays cheap however large the
            text. The log says how much of the split is scored.
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
        tokenizer: Literal["char", "byte"] = "char",
        val_tokens: int | Literal["all"] | None = None,
    ):
        super().__init__()
        if batch_size <= 0 or eval_batch_size <= 0:
            raise UserError("batch sizes must be positive")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError("need 0 < val_fraction, 0 <= test_fraction and val_fraction + test_fraction < 1")
        if tokenizer not in TOKENIZERS:
            raise UserError(f"unknown tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)}")
        if val_tokens is not None and val_tokens != "all" and not (isinstance(val_tokens, int) and val_tokens > 0):
            raise UserError(f"--data.val_tokens must be a positive number of tokens or 'all' (the whole split), "
                            f"got {val_tokens!r}")
        self.path = path or os.environ.get("GPTNANO_DATA") or None
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.val_fraction, self.test_fraction, self.val_tokens = val_fraction, test_fraction, val_tokens
        self.tokenizer_kind, self.url = tokenizer, url
        self.prompts = self._read_prompts(prompt, prompt_file)
        self._vocab = vocab or None
        self._tokenizer = None
        self._corpus: Corpus | None = None
        self.prepared: Prepared | None = None
        self.block_size: int | None = None  # taken from the model in setup()

    @staticmethod
    def _read_prompts(prompt, prompt_file) -> list[str]:
        """Prompts are checked now, before a run writes anything."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if any(p == "" for p in prompts):
            raise UserError("--data.prompt is empty: give at least one character (leave it out to start from a newline)")
        if prompt_file:
            prompts.append(read_text(Path(prompt_file), "prompt file"))
        return prompts

    # ----- the tokenizer: known before the model is built (vocab_size is linked into it)
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_kind == "char" and not self._vocab:
                # The text's own characters: from what an earlier run remembered, or one scan.
                tokenizer = CharTokenizer(self.corpus.scan(verbose=_rank_zero()).units)
                self.corpus.check(tokenizer)  # a one-character text stops here, before any model is built
            else:
                tokenizer = make_tokenizer(self._vocab, self.tokenizer_kind)
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def vocab(self) -> str:
        return self.tokenizer.vocab

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def text_path(self) -> Path:
        return Path(self.path) if self.path else DEFAULT_CACHE

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._download_if_needed()
            self._corpus = Corpus(self.text_path, self.tokenizer_kind)
        return self._corpus

    def _download_if_needed(self) -> None:
        if not DEFAULT_CACHE.exists() and (not self.path or Path(self.path).resolve() == DEFAULT_CACHE.resolve()):
            download(self.url, DEFAULT_CACHE, SHAKESPEARE_SHA256)

    # ----- preparing: Lightning calls prepare_data on one process per node, setup on all
    def prepare_data(self) -> None:
        if self.trainer is not None and self.trainer.state.fn == "predict":
            return  # predicting needs only the checkpoint (and its vocabulary)
        self._download_if_needed()
        self.prepared = self._prepare(verbose=True)

    def _prepare(self, verbose: bool) -> Prepared:
        prepared = self.corpus.prepare(self.tokenizer, self._check_lengths, verbose)
        if verbose and not prepared.built:
            print(f"gptnano: reusing {prepared.path} ({len(prepared.ids):,} {prepared.ids.dtype} tokens "
                  f"of {self.text_path})", file=sys.stderr)
        return prepared

    def _block_size(self) -> int | None:
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None:
            self.block_size = model.net.block_size
        return self.block_size

    def split_bounds(self, n: int) -> tuple[int, int]:
        """End of train and end of validation: train | val | test, contiguous."""
        return int(n * (1 - self.val_fraction - self.test_fraction)), int(n * (1 - self.test_fraction))

    def _check_lengths(self, n_tokens: int) -> None:
        """Every split must hold at least one window (block_size + 1 tokens)."""
        block = self._block_size()
        if block is None:
            return  # no model yet: nothing to measure against
        a, b = self.split_bounds(n_tokens)
        lengths = {"train": a, "val": b - a, "test": n_tokens - b}
        unit = "characters" if self.tokenizer_kind == "char" else "bytes"
        for name in ("train", "val") + (("test",) if self.test_fraction > 0 else ()):
            if lengths[name] < block + 1:
                raise UserError(f"the {name} split of {self.text_path} has {lengths[name]} {unit}, "
                                f"fewer than block_size + 1 = {block + 1}: use a longer text or a smaller block_size")

    def setup(self, stage: str) -> None:
        self._block_size()
        if stage == "predict":
            return
        if self.prepared is None:  # ranks other than 0 open what prepare_data built (and check it)
            self.prepared = self._prepare(verbose=False)
        ids = self.prepared.ids
        self._check_lengths(len(ids))  # again: this model may not be the one prepare_data saw
        a, b = self.split_bounds(len(ids))
        self.splits = {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}  # views of the file: nothing read yet
        if stage == "fit":
            self._check_epochs()
        if _rank_zero() and stage in ("fit", "validate"):
            self._describe_validation()

    def _check_epochs(self) -> None:
        """Say what an epoch is, and refuse (before the first step) an integer val_check_interval
        longer than one when validation counts epochs: Lightning would stop on it with a traceback."""
        t, n = self.trainer, self.epoch_length()
        interval = getattr(t, "val_check_interval", None) if t is not None else None
        if t is not None and t.check_val_every_n_epoch is not None and isinstance(interval, int) and interval > n:
            raise UserError(f"--trainer.val_check_interval {interval} is longer than an epoch ({n:,} batches) while "
                            f"validation counts epochs (check_val_every_n_epoch {t.check_val_every_n_epoch}): give "
                            "at most that, a fraction of an epoch, or --trainer.check_val_every_n_epoch null")
        if _rank_zero():
            _, world = self._rank()
            tokens = n * self.batch_size * self.block_size * world
            print(f"gptnano: an epoch is {n:,} batches of {self.batch_size} x {self.block_size} tokens"
                  + (f" per process ({world} processes)" if world > 1 else "")
                  + f": {tokens:,} of the training split's {len(self.splits['train']):,} tokens", file=sys.stderr)

    def _describe_validation(self) -> None:
        val = self._val_windows()
        total = len(self.splits["val"]) - 1
        if val.n_scored < val.n_windows:
            why = "--data.val_tokens" if self.val_tokens else \
                f"default beyond {FULL_PASS_TOKENS:,} tokens; --data.val_tokens all scores all"
            print(f"gptnano: validation scores {val.scored_tokens:,} of the split's {total:,} tokens "
                  f"({100 * val.scored_tokens / total:.1f} %): {val.n_scored:,} of {val.n_windows:,} windows, "
                  f"evenly spread ({why})", file=sys.stderr)

    def val_tokens_scored(self, total: int) -> int | None:
        """Tokens a validation scores out of a split of ``total`` (None: all of them)."""
        if self.val_tokens == "all":
            return None
        if self.val_tokens:
            return self.val_tokens
        return DEFAULT_VAL_TOKENS if total > FULL_PASS_TOKENS else None

    # ----- batches ------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, dataset) -> DataLoader:
        # Page-locked batches make Lightning's non_blocking copy to a CUDA device really
        # asynchronous; elsewhere pinning only costs a copy.
        pin = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return WindowLoader(dataset, batch_size=None, pin_memory=pin)

    def epoch_length(self) -> int:
        """Batches per process in one epoch of the training split (``windows.epoch_length``)."""
        _, world = self._rank()
        return epoch_length(len(self.splits["train"]), self.block_size, self.batch_size, world)

    def _global_batch(self) -> int:
        """The run's global batch index, where the next epoch (or a resumed one) starts: the optimizer
        steps taken times the batches each one took. Under overfit_batches it is 0 at every epoch's
        start: the same batches again (Lightning's promise for that flag)."""
        t = self.trainer
        if t is None or t.overfit_batches > 0:
            return 0
        return t.global_step * t.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._rank()
        return self._loader(TrainWindows(self.splits["train"], self.block_size, self.batch_size, self.seed, rank,
                                         self._global_batch, self.epoch_length()))

    def _val_windows(self) -> EvalWindows:
        rank, world = self._rank()
        tokens = self.val_tokens_scored(len(self.splits["val"]) - 1)
        limit = -(-tokens // self.block_size) if tokens else None  # ceil
        return EvalWindows(self.splits["val"], self.block_size, self.eval_batch_size, rank, world, limit)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val_windows())

    def test_dataloader(self) -> DataLoader:
        if self.test_fraction <= 0:
            raise UserError("no test split: set --data.test_fraction (e.g. 0.05) to carve one from the end of the text")
        rank, world = self._rank()
        return self._loader(EvalWindows(self.splits["test"], self.block_size, self.eval_batch_size, rank, world))

    def prompt_texts(self) -> list[str]:
        """The prompts as the model can take them (``as_prompt``), or the default prompt."""
        return [as_prompt(p, self.tokenizer) for p in self.prompts] or [default_prompt(self.tokenizer)]

    def predict_dataloader(self) -> DataLoader:
        encoded = [(i, self.tokenizer.encode(p)[None, :]) for i, p in enumerate(self.prompt_texts())]
        return DataLoader(encoded, batch_size=None)
