"""Token-bucket and fixed-size batch samplers, and the loader built on them."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from villa_plugin.common.errors import ConfigError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
from villa_plugin.datasets.loader import build_loader, set_loader_epoch
from villa_plugin.datasets.samplers import FixedSizeBatchSampler, TokenBucketBatchSampler

# ids:      0  1  2  3  4  5  6  7   -> sorted by length desc: 2(9) 4(7) 7(6) 0(5) 5(4) 1(3) 3(2) 6(1)
LENGTHS = [5, 3, 9, 2, 7, 4, 1, 6]


def _bucket(max_tokens, drop_last=False, bucket_size=8, **kw):
    return TokenBucketBatchSampler(LENGTHS, max_tokens, shuffle=False, drop_last=drop_last, bucket_size=bucket_size, size_multiple=2, **kw)


def test_token_bucket_hand_example_running_max_is_not_reset():
    # chunks [2,4] [7,0] [5,1] [3,6]; max_len stays 9 for the whole bucket
    assert list(_bucket(40)) == [[2, 4, 7, 0], [5, 1, 3, 6]]  # 9*(4+2)=54 > 40 closes the first
    assert list(_bucket(24)) == [[2, 4], [7, 0], [5, 1], [3, 6]]  # a reset max would give [5,1,3,6]
    assert list(_bucket(24, drop_last=True)) == [[2, 4], [7, 0], [5, 1]]  # the bucket's tail dropped


def test_token_bucket_buckets_are_sorted_separately():
    # buckets [5,3,9,2] and [7,4,1,6]: sorted [2,0,1,3] and [4,7,5,6]
    assert list(_bucket(36, bucket_size=4)) == [[2, 0, 1, 3], [4, 7, 5, 6]]
    assert list(_bucket(18, bucket_size=4)) == [[2, 0], [1, 3], [4, 7], [5, 6]]


def test_token_bucket_chunk_over_budget_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"batch_size_tokens=17 cannot hold one chunk of 2 examples of length 9"):
        list(_bucket(17))


def _all_ids(batches):
    return sorted(i for batch in batches for i in batch)


def test_determinism_and_shuffling_per_epoch():
    lengths = [(7 * i) % 23 + 1 for i in range(200)]
    make = lambda: TokenBucketBatchSampler(lengths, 120, seed=11, drop_last=False, size_multiple=4)  # noqa: E731
    a, b = make(), make()
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and _all_ids(a) == _all_ids(first) == list(range(200))
    other_seed = TokenBucketBatchSampler(lengths, 120, seed=12, drop_last=False, size_multiple=4)
    assert list(other_seed) != first
    assert all(len(batch) % 4 == 0 for batch in first)  # 200 ids: every chunk is full
    assert all(max(lengths[i] for i in batch) * len(batch) <= 120 for batch in first)


@pytest.mark.parametrize("kind", ["bucket", "fixed"])
def test_rank_sharding_equal_counts_for_training(kind):
    lengths = [(5 * i) % 17 + 1 for i in range(101)]

    def make(rank, drop_last):
        if kind == "bucket":
            return TokenBucketBatchSampler(lengths, 40, rank=rank, world_size=3, seed=4, drop_last=drop_last, size_multiple=2)
        return FixedSizeBatchSampler(len(lengths), 4, rank=rank, world_size=3, seed=4, drop_last=drop_last)

    train = [make(r, True) for r in range(3)]
    assert len({len(s) for s in train}) == 1
    for rank, sampler in enumerate(train):
        assert all(i % 3 == rank for batch in sampler for i in batch)
        assert sampler.batch_counts() == [len(sampler)] * 3
    evaluation = [make(r, False) for r in range(3)]
    assert _all_ids(b for s in evaluation for b in s) == list(range(101))  # every example once
    assert evaluation[0].batch_counts() == [len(s) for s in evaluation]


def test_fixed_size_batches_and_drop_last():
    sampler = FixedSizeBatchSampler(10, 4, shuffle=False, drop_last=False)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    sampler = FixedSizeBatchSampler(10, 4, shuffle=True, drop_last=True, seed=1)
    assert [len(b) for b in sampler] == [4, 4] and len(sampler) == 2


@pytest.mark.parametrize("kind", ["bucket", "fixed"])
def test_resume_skips_consumed_batches(kind):
    if kind == "bucket":
        sampler = TokenBucketBatchSampler([(3 * i) % 13 + 1 for i in range(120)], 60, seed=2, size_multiple=2)
    else:
        sampler = FixedSizeBatchSampler(120, 8, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start_batch=2)
    assert list(sampler) == full[2:] and len(sampler) == len(full) - 2 and sampler.num_batches == len(full)
    sampler.set_epoch(4)
    assert len(list(sampler)) == sampler.num_batches


class _Tiny(BaseDataset):
    def __init__(self, n=30):
        super().__init__("tiny", "train", None)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"id": index}

    def lengths(self):
        return [1 + i % 5 for i in range(self.n)]

    def collate(self, examples):
        return SampleList(ids=torch.tensor([e["id"] for e in examples]), dataset_name="tiny", dataset_type="train")


def _config(**training):
    return OmegaConf.create({"training": {"batching": "fixed", "batch_size": 4, "batch_size_tokens": 0, "num_workers": 0,
                                          "pin_memory": False, "persistent_workers": False, **training},
                             "evaluation": {"batch_size": None, "batch_size_tokens": None}})


def test_loader_uses_the_configured_batching_and_position():
    loader = build_loader(_Tiny(), _config(), "train", seed=5, epoch=2, start_batch=1)
    sampler = loader.batch_sampler
    assert isinstance(sampler, FixedSizeBatchSampler) and (sampler.epoch, sampler.start_batch) == (2, 1)
    batches = [b.ids.tolist() for b in loader]
    sampler.set_epoch(2)
    assert batches == list(sampler)[1:]
    val = build_loader(_Tiny(), _config(), "val")
    assert [len(b.ids) for b in val] == [4] * 7 + [2]  # eval keeps the tail, in order
    bucket = build_loader(_Tiny(), _config(batching="token_bucket", batch_size_tokens=40), "train")
    assert isinstance(bucket.batch_sampler, TokenBucketBatchSampler) and bucket.batch_sampler.max_tokens == 40


def test_loader_iteration_leaves_the_global_rng_alone():
    loader = build_loader(_Tiny(), _config(), "train", seed=5)
    before = torch.get_rng_state()
    list(loader)
    set_loader_epoch(loader, 1)
    list(loader)
    assert torch.equal(before, torch.get_rng_state())


def test_loader_config_errors():
    with pytest.raises(ConfigError, match="batch_size_tokens"):
        build_loader(_Tiny(), _config(batching="token_bucket"), "train")
    with pytest.raises(ConfigError, match="fixed.*token_bucket"):
        build_loader(_Tiny(), _config(batching="dynamic"), "train")
