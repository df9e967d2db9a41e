"""Batch samplers: UNITER's token buckets and fixed-size batches, sharded per rank, resumable.

Both are deterministic functions of ``(seed, epoch)``:

- sharding as UNITER: rank ``r`` of ``W`` owns ``ids[r::W]`` and batches only its own shard;
- training (``drop_last=True``) keeps the **same number of batches on every rank** by truncating
  every rank to the smallest count. Each rank computes every rank's count itself (by simulating
  the other shards, which needs only the lengths), so no communication is needed;
- evaluation (``drop_last=False``) keeps every example, so counts may differ between ranks;
  ``batch_counts()`` gives all of them for callers that must run the same number of steps;
- ``set_epoch(epoch, start_batch)`` selects the epoch and skips its first ``start_batch`` batches
  without loading them (resume mid-epoch).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from villa_plugin.common.errors import ConfigError

BUCKET_SIZE = 8192
SIZE_MULTIPLE = 8


class _ShardedBatchSampler(Sampler):
    """Shared sharding / epoch / truncation / skipping logic; subclasses batch one shard."""

    def __init__(self, num_examples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_examples = int(num_examples)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.seed = int(seed)
        self.epoch, self.start_batch = 0, 0
        self._cache: Optional[tuple] = None

    # -- epoch control ----------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use epoch ``epoch``'s order and skip its first ``start_batch`` batches."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _rng(self, rank: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, rank])

    def _shard(self, rank: int) -> List[int]:
        return list(range(rank, self.num_examples, self.world_size))

    def _batches_for(self, rank: int) -> List[List[int]]:
        raise NotImplementedError

    # -- batches ----------------------------------------------------------------------------
    def epoch_batches(self) -> List[List[int]]:
        """All of this rank's batches of the current epoch (before ``start_batch`` skipping)."""
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self._batches_for(self.rank)
            if self.drop_last and self.world_size > 1:
                batches = batches[: min(self.batch_counts(truncate=False))]
            self._cache = (self.epoch, batches)
        return self._cache[1]

    def batch_counts(self, truncate: bool = True) -> List[int]:
        """Number of batches of every rank this epoch (equal for training after truncation)."""
        counts = [len(self._batches_for(r)) for r in range(self.world_size)]
        if truncate and self.drop_last:
            counts = [min(counts)] * self.world_size
        return counts

    @property
    def num_batches(self) -> int:
        """Batches in the whole current epoch on this rank."""
        return len(self.epoch_batches())

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.epoch_batches()[self.start_batch :])

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)


class FixedSizeBatchSampler(_ShardedBatchSampler):
    """Batches of ``batch_size`` examples of this rank's shard (shuffled per epoch when training)."""

    def __init__(self, num_examples: int, batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = True, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size} (training.batch_size / evaluation.batch_size)")
        self.batch_size = int(batch_size)
        super().__init__(num_examples, rank, world_size, shuffle, drop_last, seed)

    def _batches_for(self, rank: int) -> List[List[int]]:
        ids = self._shard(rank)
        if self.shuffle:
            ids = [ids[i] for i in self._rng(rank).permutation(len(ids))]
        stop = len(ids) - len(ids) % self.batch_size if self.drop_last else len(ids)
        return [ids[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]


class TokenBucketBatchSampler(_ShardedBatchSampler):
    """UNITER's ``TokenBucketSampler`` over this rank's shard.

    Per epoch: shuffle the shard, cut it into buckets of ``bucket_size``, sort each bucket by length
    (descending), walk it in chunks of ``size_multiple`` ids; a chunk joins the batch while
    ``max_len × (n + size_multiple) ≤ max_tokens`` (padding included), where ``max_len`` is a running
    maximum not reset within a bucket. ``drop_last`` drops each bucket's trailing batch. Finally the
    batches are shuffled. ``lengths[i]`` is the token length of example ``i`` of the whole dataset.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        bucket_size: int = BUCKET_SIZE,
        size_multiple: int = SIZE_MULTIPLE,
    ):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens} (training.batch_size_tokens / evaluation.batch_size_tokens)")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens, self.bucket_size, self.size_multiple = int(max_tokens), int(bucket_size), int(size_multiple)
        super().__init__(len(self.lengths), rank, world_size, shuffle, drop_last, seed)

    def _batches_for(self, rank: int) -> List[List[int]]:
        rng = self._rng(rank)
        ids = self._shard(rank)
        if self.shuffle:
            ids = [ids[i] for i in rng.permutation(len(ids))]
        batches: List[List[int]] = []
        for start in range(0, len(ids), self.bucket_size):
            # stable sort keeps the shuffled order among equal lengths
            bucket = sorted(ids[start : start + self.bucket_size], key=lambda i: self.lengths[i], reverse=True)
            max_len, batch = 0, []
            for c in range(0, len(bucket), self.size_multiple):
                chunk = bucket[c : c + self.size_multiple]
                max_len = max(max_len, max(self.lengths[i] for i in chunk))
                if max_len * (len(batch) + self.size_multiple) > self.max_tokens:
                    if not batch:
                        raise ConfigError(
                            f"batch_size_tokens={self.max_tokens} cannot hold one chunk of {self.size_multiple} examples "
                            f"of length {max_len} ({max_len * self.size_multiple} tokens with padding). Raise "
                            f"training.batch_size_tokens (or evaluation.batch_size_tokens) to at least "
                            f"{max_len * self.size_multiple}, or shorten the inputs (max text length / regions)."
                        )
                    batches.append(batch)
                    batch = list(chunk)
                else:
                    batch.extend(chunk)
            if batch and not self.drop_last:
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches
