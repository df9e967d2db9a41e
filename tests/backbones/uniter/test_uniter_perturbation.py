"""UNITER's perturbation masks: padding tokens and padding regions are not real."""
from __future__ import annotations

import torch

from villa_plugin.backbones.uniter.perturbation import uniter_perturbation_masks
from villa_plugin.common.sample_list import SampleList


def test_masks_from_padding_and_box_counts():
    batch = SampleList(input_ids=torch.tensor([[5, 6, 0], [7, 0, 0]]), num_bbs=[2, 1], img_feat=torch.ones(2, 3, 4))
    masks = uniter_perturbation_masks(batch)
    assert masks["text"].tolist() == [[True, True, False], [True, False, False]]
    assert masks["image"].tolist() == [[True, True, False], [True, False, False]]


def test_image_mask_from_zero_features_without_box_counts():
    feat = torch.ones(2, 3, 4)
    feat[0, 2] = 0
    masks = uniter_perturbation_masks(SampleList(input_ids=torch.ones(2, 3, dtype=torch.long), img_feat=feat))
    assert masks["image"].tolist() == [[True, True, False], [True, True, True]]
