"""The official per-task pre-training losses and their normalisations (uniter-pretraining.md §4-§8).

The official model returns unreduced losses and the training loop takes ``.mean()`` of them, so
the effective normalisation differs by task. These functions return that scalar:

| task  | value                                                                 |
|-------|-----------------------------------------------------------------------|
| mlm   | CE summed over the masked tokens / number of masked tokens (whole micro-batch) |
| mrfr  | squared error summed / (masked regions × 2048)                        |
| mrc   | CE against ``argmax(soft_labels[:, 1:]) + 1`` / masked regions          |
| mrckl | ``Σ p·(log p − log q)`` / (masked regions × 1601) — **not** ``batchmean`` |
| itm   | CE mean over the micro-batch; WRA adds ``λ·(Σ_pos d − Σ_neg d) / B``     |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mlm_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``scores`` ``[n_masked, V]``, ``labels`` ``[n_masked]`` (original ids): mean over masked tokens."""
    return F.cross_entropy(scores.float(), labels, reduction="none").mean()


def mrfr_loss(predicted: torch.Tensor, feat_targets: torch.Tensor) -> torch.Tensor:
    """Per-element MSE over ``[n_masked_regions, 2048]``."""
    return F.mse_loss(predicted.float(), feat_targets.float(), reduction="none").mean()


def mrc_hard_targets(label_targets: torch.Tensor) -> torch.Tensor:
    """Hard MRC targets: the most likely non-background class, ``argmax(p[:, 1:]) + 1``."""
    return label_targets[:, 1:].argmax(dim=-1) + 1


def mrc_loss(logits: torch.Tensor, label_targets: torch.Tensor) -> torch.Tensor:
    """Hard-label MRC: CE over the 1601 logits, mean over masked regions (class 0 is never a target)."""
    return F.cross_entropy(logits.float(), mrc_hard_targets(label_targets), ignore_index=0, reduction="none").mean()


def mrckl_elementwise(logits: torch.Tensor, label_targets: torch.Tensor) -> torch.Tensor:
    """``p·(log p − log softmax(logits))`` per (region, class), with ``0·log 0 = 0``."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), label_targets.float(), reduction="none")


def mrckl_loss(logits: torch.Tensor, label_targets: torch.Tensor) -> torch.Tensor:
    """MRC-kl as trained officially: Σ KL / (n_masked_regions · 1601), i.e. the per-region KL / 1601."""
    return mrckl_elementwise(logits, label_targets).mean()


def itm_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE over ``[B, 2]`` (target 1 = matched pair), mean over the micro-batch."""
    return F.cross_entropy(scores.float(), targets, reduction="none").mean()


def wra_loss(ot_distance: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(Σ_pos d − Σ_neg d) / B``: divided by the batch size, not by each subset's size."""
    positive = ot_distance.masked_select(targets == 1)
    negative = ot_distance.masked_select(targets == 0)
    return (positive.sum() - negative.sum()) / (positive.numel() + negative.numel())


__all__ = [
    "mlm_loss",
    "mrfr_loss",
    "mrc_hard_targets",
    "mrc_loss",
    "mrckl_elementwise",
    "mrckl_loss",
    "itm_loss",
    "wra_loss",
]
