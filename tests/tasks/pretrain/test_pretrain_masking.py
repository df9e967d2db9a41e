"""Seeded MLM / MRM masking and ITM negatives: statistics, fallbacks, determinism, bad inputs."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from pretrain_testlib import SPECIALS
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.tasks.pretrain.masking import (
    TextSpecials,
    itm_image,
    itm_labels,
    mlm_text,
    random_word,
    region_mask,
    region_mask_target,
    sample_negative,
)


def test_random_word_statistics():
    rng = random.Random(0)
    tokens = list(range(5, 65))  # 60 distinct, none equal to [MASK]
    selected = masked = replaced = kept = 0
    total = 0
    for _ in range(500):
        out, labels = random_word(tokens, SPECIALS, rng)
        for original, new, label in zip(tokens, out, labels):
            total += 1
            if label == -1:
                assert new == original
                continue
            assert label == original
            selected += 1
            if new == SPECIALS.mask:
                masked += 1
            elif new == original:
                kept += 1
            else:
                replaced += 1
                assert SPECIALS.v_range[0] <= new < SPECIALS.v_range[1]
    assert abs(selected / total - 0.15) < 0.01
    assert abs(masked / selected - 0.8) < 0.02
    # a random replacement can draw the original id (then it counts as kept): 10% split ~ 1/95 of it
    assert abs(replaced / selected - 0.1) < 0.015 and abs(kept / selected - 0.1) < 0.015


def test_random_word_fallback_masks_the_first_token():
    class NeverSelect(random.Random):
        def random(self):
            return 0.99

    out, labels = random_word([40, 41, 42], SPECIALS, NeverSelect())
    assert out == [SPECIALS.mask, 41, 42] and labels == [40, -1, -1]


def test_random_word_is_pure_and_seeded():
    tokens = [7, 8, 9, 10, 11, 12]
    assert random_word(tokens, SPECIALS, random.Random(3)) == random_word(tokens, SPECIALS, random.Random(3))
    assert tokens == [7, 8, 9, 10, 11, 12]  # the input is not modified
    runs = {tuple(random_word(tokens, SPECIALS, random.Random(s))[1]) for s in range(20)}
    assert len(runs) > 1


def test_mlm_text_adds_specials_with_ignored_labels():
    ids, labels = mlm_text([20, 21], SPECIALS, random.Random(0))
    assert ids[0] == SPECIALS.cls and ids[-1] == SPECIALS.sep and len(ids) == 4
    assert labels[0] == -1 and labels[-1] == -1 and any(label != -1 for label in labels)


def test_region_mask_statistics_and_fallback():
    rng = random.Random(1)
    masks = [region_mask(36, rng) for _ in range(400)]
    rate = torch.stack(masks).float().mean().item()
    assert abs(rate - 0.15) < 0.01
    assert all(bool(m.any()) for m in masks)
    fallback_positions = Counter()
    rng = random.Random(2)
    for _ in range(300):
        mask = region_mask(4, rng, prob=0.0)  # never selected: always the fallback, exactly one region
        assert int(mask.sum()) == 1
        fallback_positions[int(mask.nonzero())] += 1
    assert set(fallback_positions) == {0, 1, 2, 3}  # a random region, not always the first (unlike MLM)


def test_region_mask_target_is_packed():
    target = region_mask_target(torch.tensor([False, True, True]), txt_len=4)
    assert target.tolist() == [False] * 4 + [False, True, True]


def test_itm_labels_ratio_and_negatives():
    labels = itm_labels(4000, np.random.RandomState(0))
    assert set(np.unique(labels)) == {0, 1} and abs((labels == 0).mean() - 0.5) < 0.03
    assert (itm_labels(10, np.random.RandomState(5)) == itm_labels(10, np.random.RandomState(5))).all()
    pool = ["a", "b", "c", "d"]
    rng = random.Random(0)
    drawn = Counter(itm_image("b", 0, pool, rng) for _ in range(600))
    assert "b" not in drawn and set(drawn) == {"a", "c", "d"}
    assert itm_image("b", 1, pool, rng) == "b"


def test_bad_inputs():
    with pytest.raises(DataError, match="two images"):
        sample_negative(["a"], ["a"], 1, random.Random(0))
    with pytest.raises(DataError, match="empty caption"):
        random_word([], SPECIALS, random.Random(0))
    with pytest.raises(DataError, match="at least one region"):
        region_mask(0, random.Random(0))
    with pytest.raises(ConfigError, match="itm_neg_prob"):
        itm_labels(3, np.random.RandomState(0), neg_prob=1.5)
    with pytest.raises(ConfigError, match="v_range"):
        TextSpecials(cls=1, sep=2, mask=3, v_range=(10, 5))
