"""SourceSampler: seeded, resumable choice of the source of each update; sampling strategies."""
from __future__ import annotations

from collections import Counter

import pytest

from villa_plugin.common.errors import ConfigError
from villa_plugin.datasets.source_sampler import SourceSampler, sampling_weights


def test_draws_follow_the_weights():
    sampler = SourceSampler({"a": 3.0, "b": 1.0}, seed=4)
    counts = Counter(sampler.next() for _ in range(4000))
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    assert sampler.draws == 4000 and sampler.probabilities == {"a": 0.75, "b": 0.25}


def test_same_seed_same_sequence_other_seed_another():
    a, b, c = (SourceSampler({"a": 1, "b": 1, "c": 1}, seed=s) for s in (1, 1, 2))
    seq_a, seq_b, seq_c = ([s.next() for _ in range(50)] for s in (a, b, c))
    assert seq_a == seq_b != seq_c
    assert set(seq_a) == {"a", "b", "c"}


def test_resume_from_the_state_continues_the_sequence():
    straight = SourceSampler({"a": 2, "b": 1}, seed=9)
    expected = [straight.next() for _ in range(30)]
    killed = SourceSampler({"a": 2, "b": 1}, seed=9)
    head = [killed.next() for _ in range(13)]
    resumed = SourceSampler({"a": 2, "b": 1}, seed=0)
    resumed.load_state_dict(killed.state_dict())
    assert head + [resumed.next() for _ in range(17)] == expected


def test_one_source_is_always_drawn():
    sampler = SourceSampler({"only": 1.0}, seed=3)
    assert {sampler.next() for _ in range(5)} == {"only"} and sampler.draws == 5


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        SourceSampler({})
    with pytest.raises(ValueError, match="finite and > 0"):
        SourceSampler({"a": 1.0, "b": 0.0})


SIZES = {"a": 300, "b": 100}


def test_strategies_give_their_weights():
    assert sampling_weights("size_proportional", SIZES, {}, "multitasking") == {"a": 300.0, "b": 100.0}
    assert sampling_weights("equal", SIZES, {}, "multitasking") == {"a": 1.0, "b": 1.0}
    assert sampling_weights("ratios", SIZES, {"b": 0.7, "a": 0.3}, "multitasking") == {"a": 0.3, "b": 0.7}


@pytest.mark.parametrize("strategy, ratios, message", [
    ("uniform", {}, r"multitasking.type must be one of size_proportional, equal, ratios"),
    ("equal", {"a": 1, "b": 2}, r"sampling_ratios is set but multitasking.type is equal.*type=ratios"),
    ("ratios", {"a": 1}, r"one weight per train dataset \(a, b\); missing: b"),
    ("ratios", {"a": 1, "b": 1, "c": 1}, r"not a train dataset: c"),
    ("ratios", {"a": 1, "b": -1}, r"positive numbers"),
])
def test_bad_sampling_settings_name_the_key(strategy, ratios, message):
    with pytest.raises(ConfigError, match=message):
        sampling_weights(strategy, SIZES, ratios, "multitasking")
