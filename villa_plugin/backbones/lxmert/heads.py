"""LXMERT's task heads as the official port builds them (lxmert.md §6), registered as ``TaskHead`` s.

Every head reads only the pooled language [CLS] (``TrunkOutput.pooled``) and is one ``logit_fc``
Sequential ``Linear(in, 2H), GeLU (erf), LayerNorm(2H, eps 1e-12), Linear(2H, num_labels)``
(checkpoint keys ``logit_fc.{0,2,3}.*``; index 1 is the parameter-free GeLU):

- ``lxmert_vqa`` / ``lxmert_gqa``: ``in = H``, one row per example; task loss BCE-with-logits mean × A
  (``logit_bce``); KL reduction ``mean_times_classes`` (element mean × A = Σ/B).
- ``lxmert_nlvr2``: two rows per example (the sentence with the left, then the right image); the two
  pooled vectors are concatenated, ``in = 2H``, ``num_labels = 2``; task loss cross-entropy mean over
  B; KL reduction ``mean`` (``F.kl_div``'s default ``'mean'`` over ``[B, 2]`` = Σ/(2B), no factor).

``default_losses`` is the head's official task loss, used when ``model_config.lxmert.losses`` is null.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional

import torch
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.models.heads import TaskHead
from villa_plugin.models.trunk import TrunkDims, TrunkOutput
from villa_plugin.registry import registry


class LxmertLogitHead(nn.Sequential):
    """The official ``logit_fc``; ``forward`` takes the pooled rows ``[R, H]`` and concatenates each
    example's ``rows_per_example`` consecutive rows first (NLVR2: ``view(-1, 2H)``).
    ``dims``: anything with ``hidden_size`` and ``layer_norm_eps`` (``TrunkDims``, ``LxmertConfig``)."""

    def __init__(self, dims: Any, num_labels: int, rows_per_example: int = 1):
        hidden = dims.hidden_size
        super().__init__(
            nn.Linear(hidden * rows_per_example, hidden * 2),
            nn.GELU(),
            nn.LayerNorm(hidden * 2, eps=dims.layer_norm_eps),
            nn.Linear(hidden * 2, num_labels),
        )
        self.rows_per_example = rows_per_example

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        rows, hidden = pooled.shape
        if rows % self.rows_per_example:
            raise ValueError(
                f"This LXMERT head pools {self.rows_per_example} rows per example but the batch has {rows} rows."
            )
        return super().forward(pooled.reshape(rows // self.rows_per_example, hidden * self.rows_per_example))


class LxmertHead(TaskHead):
    """Base of the LXMERT heads: ``logit_fc`` on the pooled language [CLS] of ``rows_per_example`` rows."""

    module_name = "logit_fc"
    rows_per_example: ClassVar[int] = 1
    fixed_labels: ClassVar[Optional[int]] = None
    default_losses: ClassVar[List[Any]] = ["logit_bce"]

    def __init__(self, dims: TrunkDims, num_labels: int, head_config: Dict[str, Any]):
        super().__init__(dims, num_labels, head_config)
        name = type(self).__name__
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"model_config.<model>.num_labels must be a positive integer for head {name}, got {num_labels!r}.")
        if self.fixed_labels is not None and num_labels != self.fixed_labels:
            raise ConfigError(f"Head {name} predicts {self.fixed_labels} classes; set model_config.<model>.num_labels: {self.fixed_labels}.")
        self.logit_fc = LxmertLogitHead(dims, num_labels, self.rows_per_example)

    def forward(self, trunk: TrunkOutput, batch: Any) -> torch.Tensor:
        return self.logit_fc(trunk.require_pooled(type(self).__name__))


@registry.register_head("lxmert_vqa")
class LxmertVqaHead(LxmertHead):
    """VQA v2 (3129 answers): soft-score BCE × A."""

    kl_reduction = "mean_times_classes"

    def __init__(self, dims: TrunkDims, num_labels: int, head_config: Dict[str, Any]):
        super().__init__(dims, num_labels, head_config)
        self.label_width = num_labels  # one score per answer of the dataset's answer vocabulary


@registry.register_head("lxmert_gqa")
class LxmertGqaHead(LxmertVqaHead):
    """GQA (1842 answers): the VQA head and loss (the official ``--mceLoss`` is not offered)."""


@registry.register_head("lxmert_nlvr2")
class LxmertNlvr2Head(LxmertHead):
    """NLVR2: the two rows' pooled vectors concatenated; cross-entropy over True/False."""

    kl_reduction = "mean"
    rows_per_example = 2
    fixed_labels = 2
    default_losses = [{"type": "cross_entropy", "params": {"ignore_index": -1}}]


__all__ = ["LxmertHead", "LxmertLogitHead", "LxmertVqaHead", "LxmertGqaHead", "LxmertNlvr2Head"]
