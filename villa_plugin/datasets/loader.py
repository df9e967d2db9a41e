"""DataLoaders over a dataset split with the configured batch sampler (see samplers.py).

Config keys: ``training.batching`` (fixed | token_bucket), ``training.batch_size`` (examples per
process per micro-batch), ``training.batch_size_tokens`` (tokens per process per micro-batch),
``training.num_workers`` / ``pin_memory`` / ``persistent_workers``. Evaluation splits use
``evaluation.batch_size`` / ``evaluation.batch_size_tokens`` when set, else the training values.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from villa_plugin.common.errors import ConfigError
from villa_plugin.datasets.samplers import FixedSizeBatchSampler, TokenBucketBatchSampler
from villa_plugin.common.config_access import setting
from villa_plugin.datasets.worker_signals import shield_worker_from_stop_signals


def build_batch_sampler(dataset, config: Any, split: str, rank: int = 0, world_size: int = 1, seed: int = 0):
    """The batch sampler of ``split``: shuffled and truncated-to-equal-counts for ``train`` only."""
    training = split == "train"
    batching = str(setting(config, "training.batching"))
    common = dict(rank=rank, world_size=world_size, shuffle=training, drop_last=training, seed=seed)
    if batching == "fixed":
        size = _eval_or_train(config, "batch_size", training)
        if not size or int(size) < 1:
            raise ConfigError(f"training.batching=fixed needs a batch size >= 1 (training.batch_size / evaluation.batch_size), got {size}")
        return FixedSizeBatchSampler(len(dataset), int(size), **common)
    if batching == "token_bucket":
        key = "training.batch_size_tokens" if training else "evaluation.batch_size_tokens"
        tokens = _eval_or_train(config, "batch_size_tokens", training)
        if not tokens or int(tokens) < 1:
            raise ConfigError(
                f"training.batching=token_bucket needs {key} (tokens per process per micro-batch, padding "
                f"included; UNITER's train_batch_size), got {tokens}"
            )
        lengths = list(dataset.lengths())
        if len(lengths) != len(dataset):
            raise ConfigError(f"{type(dataset).__name__}.lengths() gave {len(lengths)} lengths for {len(dataset)} examples")
        return TokenBucketBatchSampler(lengths, int(tokens), **common)
    raise ConfigError(f'training.batching must be "fixed" or "token_bucket", got "{batching}"')


def _eval_or_train(config: Any, name: str, training: bool) -> Any:
    """``training.<name>``; for evaluation ``evaluation.<name>`` unless null (= the training value)."""
    value = None if training else setting(config, f"evaluation.{name}")
    return setting(config, f"training.{name}") if value is None else value


def build_loader(dataset, config: Any, split: str, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0, start_batch: int = 0) -> DataLoader:
    """A DataLoader over ``dataset`` with ``dataset.collate`` and the configured batch sampler,
    positioned at ``epoch`` after ``start_batch`` batches."""
    sampler = build_batch_sampler(dataset, config, split, rank, world_size, seed)
    workers = int(setting(config, "training.num_workers"))
    persistent = bool(setting(config, "training.persistent_workers")) and workers > 0
    if persistent and callable(getattr(dataset, "set_epoch", None)):
        raise ConfigError(
            f"training.persistent_workers=true with {type(dataset).__name__}, which draws per epoch (set_epoch): "
            f"persistent workers would keep their first epoch's copy. Set training.persistent_workers=false."
        )
    # A private generator: creating an iterator then never draws from the global torch RNG, which
    # keeps resumed runs bit-identical to uninterrupted ones.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=dataset.collate,
        num_workers=workers,
        pin_memory=bool(setting(config, "training.pin_memory")),
        persistent_workers=persistent,
        generator=torch.Generator(),
        worker_init_fn=shield_worker_from_stop_signals if workers > 0 else None,  # preemption: see worker_signals
    )
    set_loader_epoch(loader, epoch, start_batch)
    return loader


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Select the epoch (order, worker seeds and a dataset's ``set_epoch(seed, epoch)``, e.g. pre-training
    masks) and skip ``start_batch`` batches of it."""
    sampler = loader.batch_sampler
    sampler.set_epoch(epoch, start_batch)
    if callable(getattr(loader.dataset, "set_epoch", None)):  # per-epoch draws (pre-training masks)
        loader.dataset.set_epoch(sampler.seed, epoch)
    loader.generator.manual_seed(_worker_seed(sampler.seed, sampler.rank, epoch))


def _worker_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)
