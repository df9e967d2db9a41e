"""Registered losses and the Losses container."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from villa_plugin.common.sample_list import SampleList
from villa_plugin.losses import Losses
from villa_plugin.registry import RegistryError


def _batch(targets):
    return SampleList(targets=targets, dataset_name="vqa2", dataset_type="train")


def test_logit_bce_is_sum_over_labels_mean_over_batch():
    scores = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.9, 0.0]])
    losses = Losses(["logit_bce"])(_batch(targets), {"scores": scores})
    elementwise = -(targets * F.logsigmoid(scores) + (1 - targets) * F.logsigmoid(-scores))
    assert list(losses) == ["train/vqa2/logit_bce"]
    assert float(losses["train/vqa2/logit_bce"]) == pytest.approx(float(elementwise.sum(1).mean()), rel=1e-6)


def test_cross_entropy_with_params_and_keys_per_split():
    scores = torch.tensor([[2.0, -1.0], [0.0, 1.0], [0.3, 0.2]])
    targets = torch.tensor([0, 1, 1])
    batch = SampleList(targets=targets, dataset_name="snli_ve", dataset_type="val")
    losses = Losses([{"type": "cross_entropy", "params": {"reduction": "sum"}}])(batch, {"scores": scores})
    assert float(losses["val/snli_ve/cross_entropy"]) == pytest.approx(float(F.cross_entropy(scores, targets, reduction="sum")))


def test_several_losses_and_unknown_name():
    batch = _batch(torch.tensor([[1.0, 0.0]]))
    losses = Losses(["logit_bce", "cross_entropy"])
    assert len(losses) == 2
    assert set(losses(batch, {"scores": torch.zeros(1, 2)})) == {"train/vqa2/logit_bce", "train/vqa2/cross_entropy"}
    with pytest.raises(RegistryError, match='Unknown loss "logit_bc".*logit_bce'):
        Losses(["logit_bc"])
