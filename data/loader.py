"""Batches from memory-mapped shards.

The training split is cut into windows of `seq_len` tokens (documents packed, BOS at each document
start; a window may begin inside a document). Each epoch visits the windows in a fresh permutation
drawn from (seed, epoch). Global micro-batch `m` takes the slots m·W·B … (m+1)·W·B − 1 of that
order (W ranks, B sequences each) and rank r takes its own B of them. So a batch depends only on
(seed, m, rank): a resumed run sees exactly what an uninterrupted one would, and ranks never share
a window within an epoch. Validation reads the validation shard only, in order, without shuffling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from core.files import UserError, read_json
from data.shards import read_shard


class Batch(NamedTuple):
    tokens: torch.Tensor  # (B, T) int64 token ids
    labels: torch.Tensor | None  # (B, T) int64 concept ids (synthetic corpus), else None
    index: np.ndarray  # type: ignore[assignment]  # (shadows tuple.index) (B,) global slot (training) or window index (sequential): what seeds the noise


class ShardLoader:
    def __init__(self, folder: str | Path, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, files: list[str] | None = None) -> None:
        """`files` restricts the split to these shards (a run keeps reading the shards it started with,
        even after more were prepared into the same folder)."""
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            raise UserError(f"{folder} is not a prepared dataset (no meta.json); run python -m data.prepare")
        meta = read_json(meta_path)  # a damaged one: one line naming it
        if not isinstance(meta, dict) or not meta.get("complete"):
            raise UserError(f"{folder} was not finished; rerun python -m data.prepare to complete it")
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        available = [s["file"] for s in meta["shards"] if s["split"] == split]
        missing = [f for f in files or [] if f not in available]
        if missing:
            raise UserError(f"{folder} no longer holds the shard(s) {missing} this run was trained on")
        files = files or available
        self.tokens = [read_shard(folder / f) for f in files]
        self.labels = ([read_shard(folder / f.replace(".bin", ".labels.bin")) for f in files]
                       if meta.get("labels") else None)
        per_shard = np.array([len(t) // seq_len for t in self.tokens], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(per_shard)])
        self.n_windows = int(self._starts[-1])
        needed = world_size * batch_size if split == "train" else 1
        if self.n_windows < needed:
            raise UserError(f"the {split} split of {folder} holds {self.n_windows} window(s) of {seq_len} tokens, "
                            f"fewer than one batch needs ({needed}); "
                            "use a shorter sequence length, a smaller batch or more data")
        self._perm_cache: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)}
        return self._perm_cache[epoch]

    def _gather(self, windows: np.ndarray, index: np.ndarray) -> Batch:
        shard = np.searchsorted(self._starts, windows, side="right") - 1
        offset = (windows - self._starts[shard]) * self.seq_len
        take = lambda arrays: torch.from_numpy(np.stack(  # noqa: E731
            [arrays[s][o:o + self.seq_len].astype(np.int64) for s, o in zip(shard, offset)]))
        return Batch(take(self.tokens), take(self.labels) if self.labels is not None else None, index)

    def slots(self, micro_batch: int) -> np.ndarray:
        """The global slots (positions in the endless shuffled stream) of this rank's sequences."""
        first = (micro_batch * self.world_size + self.rank) * self.batch_size
        return first + np.arange(self.batch_size)

    def window_ids(self, micro_batch: int) -> np.ndarray:
        """Which windows rank `self.rank` reads at global micro-batch `micro_batch`."""
        epochs, pos = np.divmod(self.slots(micro_batch), self.n_windows)
        return np.array([self._order(int(e))[p] for e, p in zip(epochs, pos)], dtype=np.int64)

    def batch(self, micro_batch: int) -> Batch:
        """The (B, T) batch of this rank at global micro-batch `micro_batch` (= step·grad_acc + micro)."""
        return self._gather(self.window_ids(micro_batch), self.slots(micro_batch))

    def n_sequential(self, max_tokens: int | None = None) -> int:
        """How many windows `sequential(max_tokens)` reads over all ranks."""
        return self.n_windows if max_tokens is None else min(self.n_windows, max(1, max_tokens // self.seq_len))

    def sequential(self, max_tokens: int | None = None) -> Iterator[Batch]:
        """The split in order (validation): the first `max_tokens` tokens, this rank's share, in batches."""
        mine = np.arange(self.rank, self.n_sequential(max_tokens), self.world_size)
        for i in range(0, len(mine), self.batch_size):
            yield self._gather(mine[i:i + self.batch_size], mine[i:i + self.batch_size])
