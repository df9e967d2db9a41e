"""Referring-expression heads ``re`` (``mlp=1``) and ``re_mlp2`` (``mlp=2``), UNITER's ``model/re.py``.

The head scores every *region* of the row, not the pooled ``[CLS]``:

1. the region outputs are read from the trunk's sequence output (``[CLS] text [SEP] regions`` with
   ``gather_index``: row i's regions sit at ``txt_lens[i] .. txt_lens[i] + num_bbs[i]``; without
   ``gather_index`` they follow the padded text, at ``Lt .. Lt + num_bbs[i]``);
2. ``re_output`` maps each to one logit: ``Linear(H, 1)`` (``re``, the refcoco / refcocog configs)
   or ``Seq(Linear(H, H), GELU, LayerNorm(H), Linear(H, 1))`` (``re_mlp2``, the refcoco+ config);
3. padding regions get **-1e4**, so they never win an argmax and have probability 0 in a softmax.

Scores are ``[B, max_nbb]``. Training losses (``targets`` = the referred region's index [B], -100
= no usable target, skipped):

- ``cls``: the registered ``cross_entropy`` loss. UNITER **sums** it over the batch (``params:
  {reduction: sum}``); ``reduction: mean`` is offered too (our VILLA configs use it so that the
  KL term, a mean over rows, keeps VILLA's usual relative weight).
- ``rank``: ``re_rank`` below, UNITER's hinge ``clamp(margin + σ(s_neg) - σ(s_pos), 0)`` with one
  negative region per row: the highest-scoring wrong region with probability ``hard_ratio``
  (0.3), else a random wrong region; summed over the batch like UNITER's ``loss.sum()``.

VILLA (not in the official code; our definition): the symmetric KL between the clean and the
perturbed softmax over the regions of each row, reduced with ``sum_classes_mean`` (sum over
regions, mean over rows). Padding regions are -1e4 in both logits, hence probability 0 in both,
and contribute exactly 0.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.models.heads import TaskHead
from villa_plugin.models.trunk import TokenLayout, TrunkDims, TrunkOutput
from villa_plugin.registry import registry

PAD_SCORE = -1e4  # UNITER's fill value for non-region positions
IGNORE_INDEX = -100  # rows without a usable target (torch's cross_entropy default ignore_index)


def build_re_output(dims: TrunkDims, mlp: int = 1) -> nn.Module:
    """``re_output``: Linear(H, 1) for ``mlp=1``; Seq(Linear(H, H), GELU, LayerNorm, Linear(H, 1)) for ``mlp=2``."""
    hidden = dims.hidden_size
    if mlp == 1:
        return nn.Linear(hidden, 1)
    if mlp == 2:
        return nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=dims.layer_norm_eps),
            nn.Linear(hidden, 1),
        )
    raise ValueError(f"re_output supports mlp=1 or mlp=2, got {mlp}")


def _lens(layout: TokenLayout, key: str, device: torch.device) -> torch.Tensor:
    value = getattr(layout, key)
    if value is None:
        raise KeyError(f"The RE head needs the batch field '{key}' (per-row lengths, as collate_rows gives them)")
    return torch.as_tensor(value, dtype=torch.long, device=device).reshape(-1)


def region_outputs(sequence_output: torch.Tensor, layout: TokenLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """The region part of the sequence output: ``(hidden [B, max_nbb, H], pad [B, max_nbb])``.

    ``pad`` is True at padding regions (``k >= num_bbs[i]``); their hidden states are those of some
    other position and must be masked by the caller.
    """
    device = sequence_output.device
    num_bbs = _lens(layout, "num_bbs", device)
    max_nbb = int(layout.image_width)
    if layout.packed:
        start = _lens(layout, "txt_lens", device)  # packed layout: regions follow each row's own text
    else:
        start = torch.full_like(num_bbs, int(layout.text_width))  # padded concatenation
    k = torch.arange(max_nbb, device=device)
    pad = k.unsqueeze(0) >= num_bbs.unsqueeze(1)
    index = (start.unsqueeze(1) + k.unsqueeze(0)).clamp(max=sequence_output.size(1) - 1)
    index = index.unsqueeze(-1).expand(-1, -1, sequence_output.size(-1))
    return sequence_output.gather(1, index), pad


@registry.register_head("re")
class ReHead(TaskHead):
    """``re_output`` on every region's output: scores ``[B, max_nbb]``, padding regions at -1e4."""

    module_name = "re_output"
    kl_reduction = "sum_classes_mean"
    uses_pooler = False
    mlp = 1

    def __init__(self, dims: TrunkDims, num_labels: int, head_config: Dict[str, Any]):
        super().__init__(dims, num_labels, head_config)
        if num_labels != 1:
            raise ConfigError(f"The {self.module_name} head scores each region with one logit: set num_labels: 1 "
                              f"(got {num_labels}).")
        self.re_output = build_re_output(dims, self.mlp)

    def forward(self, trunk: TrunkOutput, batch: Any) -> torch.Tensor:
        hidden, pad = region_outputs(trunk.sequence, trunk.layout)
        scores = self.re_output(hidden).squeeze(-1)
        return scores.masked_fill(pad, PAD_SCORE)


@registry.register_head("re_mlp2")
class ReMlp2Head(ReHead):
    """:class:`ReHead` with the two-layer ``re_output`` (the refcoco+ config)."""

    mlp = 2


def sample_negative_regions(scores: torch.Tensor, targets: torch.Tensor, num_bbs: torch.Tensor,
                            hard_ratio: float, generator: torch.Generator = None) -> torch.Tensor:
    """One wrong region per row ``[B]``: the best-scoring non-target region with probability
    ``hard_ratio``, else a uniformly random non-target region (UNITER's ``sample_neg_ix``).

    Rows with a single region have no wrong region; they get the target itself (zero hinge weight
    is the caller's business).
    """
    device = scores.device
    rows, width = scores.shape
    k = torch.arange(width, device=device).unsqueeze(0)
    valid = (k < num_bbs.unsqueeze(1)) & (k != targets.clamp(min=0).unsqueeze(1))
    hard = scores.detach().float().masked_fill(~valid, float("-inf")).argmax(dim=1)
    noise = torch.rand(rows, width, device=device, generator=generator)
    easy = noise.masked_fill(~valid, -1.0).argmax(dim=1)  # uniform among the valid regions
    use_hard = torch.rand(rows, device=device, generator=generator) < hard_ratio
    negative = torch.where(use_hard, hard, easy)
    return torch.where(valid.any(dim=1), negative, targets.clamp(min=0))


@registry.register_loss("re_rank")
class ReferringRankLoss(nn.Module):
    """UNITER's RE ``rank`` loss: ``Σ_rows clamp(margin + σ(s_neg) - σ(s_pos), 0)``.

    ``reduction``: ``sum`` (UNITER: ``loss.sum()`` over the batch) or ``mean``. Rows whose target is
    negative (no usable gt region) or that have one region only are skipped.
    """

    def __init__(self, margin: float = 0.2, hard_ratio: float = 0.3, reduction: str = "sum"):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f're_rank reduction must be "sum" or "mean", got {reduction!r}')
        self.margin, self.hard_ratio, self.reduction = float(margin), float(hard_ratio), reduction

    def forward(self, sample_list, model_output: Dict[str, Any]) -> torch.Tensor:
        scores = model_output["scores"].float()
        targets = sample_list["targets"].to(scores.device).long().reshape(-1)
        num_bbs = torch.as_tensor(sample_list["num_bbs"], dtype=torch.long, device=scores.device)
        negative = sample_negative_regions(scores, targets, num_bbs, self.hard_ratio)
        usable = (targets >= 0) & (negative != targets.clamp(min=0))
        pos = torch.sigmoid(scores.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1))
        neg = torch.sigmoid(scores.gather(1, negative.unsqueeze(1)).squeeze(1))
        hinge = torch.clamp(self.margin + neg - pos, min=0) * usable.to(scores.dtype)
        if self.reduction == "sum":
            return hinge.sum()
        return hinge.sum() / usable.sum().clamp(min=1)


__all__ = [
    "PAD_SCORE",
    "IGNORE_INDEX",
    "ReHead",
    "ReMlp2Head",
    "build_re_output",
    "region_outputs",
    "sample_negative_regions",
    "ReferringRankLoss",
]
