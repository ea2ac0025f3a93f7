"""The windows a model trains and is scored on, read from prepared token ids.

Training batches are a pure function of (seed, global batch index, rank): no sampler state,
so a run resumed from a checkpoint draws exactly the batches it would have drawn, and DDP
ranks draw different ones. The stream has a length, one *epoch*: enough batches to cover
the training split about once, so that everything Lightning counts in epochs (max_epochs,
a fractional val_check_interval, limit_train_batches) has something to count; the length
only says where epochs end, never which batch a step draws. Evaluation is one
deterministic pass over a split (or a fixed, evenly spread part of it), in batches that
are counted too. torch only, no Lightning.
"""

import numpy as np
import torch
from torch.utils.data import IterableDataset


def rows(data, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``data[s : s + length]`` for every start ``s``, as one int64 tensor ``[len(starts), length]``.

    ``data`` is 1-D token ids: prepared ``Tokens`` in a file (only these rows are
    read) or a tensor (one gather)."""
    if isinstance(data, torch.Tensor):
        return data[starts[:, None] + torch.arange(length)].long()
    return torch.from_numpy(data.rows(starts.numpy(), length).astype(np.int64))


def epoch_length(n_tokens: int, block_size: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per process in one epoch: enough for all processes together to read about every
    one of the split's ``n_tokens`` training tokens once, ``n_tokens // (block_size * batch_size *
    world_size)``, and at least one."""
    return max(1, (n_tokens - 1) // (block_size * batch_size * world_size))


class TrainWindows(IterableDataset):
    """The stream of training batches ``(x, y)``, each ``[batch_size, block_size]`` token ids.

    Batch number ``s`` (counted over the whole run, never restarted at an epoch's start) is
    drawn from a generator seeded by ``(seed, s, rank)``. Iteration starts at ``start()``, the
    run's global batch index when Lightning asks for an iterator (at every epoch's start, and
    again on a resume), so an epoch goes on where the last one ended and a resumed run continues
    the very same stream. ``len()`` is the epoch's length (``epoch_length``); the iterator itself
    does not end: Lightning stops it after that many batches, or fewer (limit_train_batches).

    ``start`` returning 0 every time makes batch i of every epoch the same: what
    ``overfit_batches`` asks for (the data module passes that ``start`` then).
    """

    def __init__(self, data, block_size: int, batch_size: int, seed: int, rank: int, start,
                 length: int | None = None):
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed, self.rank, self.start = seed, rank, start
        self.length = length if length is not None else epoch_length(len(data), block_size, batch_size)

    def __len__(self) -> int:
        return self.length

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A tuple of ints hashes the same in every process (no hash randomisation).
        g = torch.Generator().manual_seed(hash((self.seed, step, self.rank)) % 2**63)
        starts = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=g)
        window = rows(self.data, starts, self.block_size + 1)  # (B, T+1)
        return window[:, :-1], window[:, 1:]

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

    ``max_windows`` scores only that many of the N windows, spread evenly over
    the split (window ``j * N // max_windows`` for j = 0, 1, ...): a fixed subset,
    the same at every validation and for any number of ranks. Window starts are
    computed per batch, so memory does not grow with the split.
    """

    def __init__(self, data, block_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_windows: int | None = None):
        self.n_targets = len(data) - 1
        self.n_full = self.n_targets // block_size  # windows that tile the split from its start
        self.tail = self.n_targets - self.n_full * block_size  # targets not covered by them
        self.n_windows = self.n_full + (self.tail > 0)  # + one window aligned to the end
        self.n_scored = min(max_windows or self.n_windows, self.n_windows)
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Batches this rank yields in one pass (every rank yields as many: see ``__iter__``)."""
        return -(-len(range(0, self.n_scored, self.world_size)) // self.batch_size)

    def _windows(self, j: torch.Tensor) -> torch.Tensor:
        """Window number of the j-th scored window."""
        return j if self.n_scored == self.n_windows else j * self.n_windows // self.n_scored

    @property
    def scored_tokens(self) -> int:
        """Targets scored by one pass (every rank's share together)."""
        last_scored = self._windows(torch.tensor(self.n_scored - 1)).item() == self.n_full
        return self.n_scored * self.block_size - (self.block_size - self.tail if self.tail and last_scored else 0)

    def __iter__(self):
        n_mine = len(range(self.rank, self.n_scored, self.world_size))
        # Every rank yields as many batches as the busiest one: under DDP each forward may be a
        # collective (buffers are broadcast), so a rank stopping one batch early would hang the
        # others. A rank out of windows scores a repeat of window 0 with every target masked.
        n_most = len(range(0, self.n_scored, self.world_size))
        for lo in range(0, n_most, self.batch_size):
            if lo >= n_mine:
                r = rows(self.data, torch.zeros(1, dtype=torch.long), self.block_size + 1)
                yield r[:, :-1], torch.full_like(r[:, 1:], -100)
                continue
            j = self.rank + self.world_size * torch.arange(lo, min(lo + self.batch_size, n_mine))
            window = self._windows(j)
            starts = torch.where(window < self.n_full, window * self.block_size, self.n_targets - self.block_size)
            r = rows(self.data, starts, self.block_size + 1)
            x, y = r[:, :-1], r[:, 1:].clone()
            if self.tail:
                y[window == self.n_full, : self.block_size - self.tail] = -100  # scored by the previous window
            yield x, y
