"""Conditional masking and ITM negative sampling as pure, seeded functions (uniter-pretraining.md §4-§6).

Each function draws from the generator it is given, in the official order of draws, so a
``random.Random(seed)`` reproduces the official stream of Python's global ``random`` seeded alike
(and a ``numpy.random.RandomState(seed)`` that of ``np.random`` for the ITM labels). MLM masks text
only, MRFR/MRC mask regions only, ITM masks nothing.
"""
from __future__ import annotations

import dataclasses
import random
from typing import List, Sequence, Tuple

import numpy as np
import torch

from villa_plugin.common.errors import ConfigError, DataError

MLM_PROB = 0.15
MRM_PROB = 0.15
ITM_NEG_PROB = 0.5
IGNORE_LABEL = -1


@dataclasses.dataclass(frozen=True)
class TextSpecials:
    """Special ids of the tokenizer (a txt_db's ``meta.json``): ``[CLS]``, ``[SEP]``, ``[MASK]`` and
    ``v_range``, the ``[low, high)`` ids random replacements are drawn from (bert-base-cased: [106, 28996))."""

    cls: int
    sep: int
    mask: int
    v_range: Tuple[int, int]

    def __post_init__(self) -> None:
        low, high = self.v_range
        if not 0 <= low < high:
            raise ConfigError(f"TextSpecials.v_range must be [low, high) with 0 <= low < high, got {self.v_range}.")


def random_word(tokens: Sequence[int], specials: TextSpecials, rng: random.Random,
                prob: float = MLM_PROB) -> Tuple[List[int], List[int]]:
    """BERT masking of one caption (wordpieces without specials) -> ``(masked tokens, labels)``.

    Each token is selected with ``prob``; a selected token becomes ``[MASK]`` (80%), a uniform id of
    ``v_range`` (10%, one extra draw) or stays (10%), and its label is its original id; others get
    -1. If nothing was selected, the first token becomes ``[MASK]`` with its label (no 80/10/10).
    """
    if not tokens:
        raise DataError("random_word got an empty caption; MLM needs at least one wordpiece.")
    masked, labels = list(tokens), []
    for i, token in enumerate(tokens):
        draw = rng.random()
        if draw < prob:
            draw /= prob
            if draw < 0.8:
                masked[i] = specials.mask
            elif draw < 0.9:
                masked[i] = rng.choice(range(*specials.v_range))
            labels.append(int(token))
        else:
            labels.append(IGNORE_LABEL)
    if all(label == IGNORE_LABEL for label in labels):
        labels[0] = masked[0]
        masked[0] = specials.mask
    return masked, labels


def mlm_text(tokens: Sequence[int], specials: TextSpecials, rng: random.Random,
             prob: float = MLM_PROB) -> Tuple[List[int], List[int]]:
    """``(input_ids, txt_labels)`` with ``[CLS]``/``[SEP]`` added (label -1 on both)."""
    masked, labels = random_word(tokens, specials, rng, prob)
    return [specials.cls] + masked + [specials.sep], [IGNORE_LABEL] + labels + [IGNORE_LABEL]


def plain_text(tokens: Sequence[int], specials: TextSpecials) -> List[int]:
    """``[CLS] tokens [SEP]`` (MRFR, MRC and ITM leave the text unmasked)."""
    if not tokens:
        raise DataError("Empty caption: a pre-training example needs at least one wordpiece.")
    return [specials.cls] + [int(t) for t in tokens] + [specials.sep]


def region_mask(num_bb: int, rng: random.Random, prob: float = MRM_PROB) -> torch.Tensor:
    """Bool ``[num_bb]``: each region masked with ``prob``; if none, one chosen uniformly."""
    if num_bb < 1:
        raise DataError("region_mask needs at least one region.")
    mask = [rng.random() < prob for _ in range(num_bb)]
    if not any(mask):
        mask[rng.choice(range(num_bb))] = True
    return torch.tensor(mask, dtype=torch.bool)


def region_mask_target(mask: torch.Tensor, txt_len: int) -> torch.Tensor:
    """``img_mask_tgt`` row: ``txt_len`` False then the region mask (the masked regions in the packed row)."""
    return torch.cat([torch.zeros(txt_len, dtype=torch.bool), mask.bool()])


def itm_labels(num_examples: int, rng: np.random.RandomState, neg_prob: float = ITM_NEG_PROB) -> np.ndarray:
    """One label per caption for an epoch: 0 (negative) with ``neg_prob``, else 1 (``np.random.choice``)."""
    if not 0.0 <= neg_prob <= 1.0:
        raise ConfigError(f"itm_neg_prob must be in [0, 1], got {neg_prob}.")
    return rng.choice([0, 1], size=num_examples, p=[neg_prob, 1 - neg_prob])


def sample_negative(pool: Sequence[str], ground_truths: Sequence[str], num_sample: int,
                    rng: random.Random) -> List[str]:
    """``num_sample`` items of ``pool`` none of which is a ground truth: redraw ``rng.sample`` until so."""
    if len(set(pool) - set(ground_truths)) < num_sample:
        raise DataError(
            f"Cannot sample {num_sample} ITM negative image(s): the pool has {len(set(pool))} distinct image(s), "
            f"all but {len(set(pool) - set(ground_truths))} of them ground truths. ITM needs captions of at "
            f"least two images per rank."
        )
    outputs = list(ground_truths[:1])
    while any(o in ground_truths for o in outputs):
        outputs = rng.sample(list(pool), num_sample)
    return outputs


def itm_image(img_fname: str, label: int, pool: Sequence[str], rng: random.Random) -> str:
    """The image an ITM example shows: its own (label 1) or a different one of ``pool`` (label 0)."""
    return img_fname if int(label) == 1 else sample_negative(pool, [img_fname], 1, rng)[0]


__all__ = [
    "TextSpecials",
    "random_word",
    "mlm_text",
    "plain_text",
    "region_mask",
    "region_mask_target",
    "itm_labels",
    "sample_negative",
    "itm_image",
]
