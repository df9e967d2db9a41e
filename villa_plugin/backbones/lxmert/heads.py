"""LXMERT's task heads as the official port builds them (lxmert.md §6) and their VILLA KL reductions.

Every head reads only the pooled language [CLS] and is one ``logit_fc`` Sequential
``Linear(in, 2H), GeLU (erf), LayerNorm(2H, eps 1e-12), Linear(2H, num_labels)`` (checkpoint keys
``logit_fc.{0,2,3}.*``; index 1 is the parameter-free GeLU):

- ``vqa`` / ``gqa``: ``in = H``, one row per example; task loss BCE-with-logits mean × A
  (``logit_bce``); KL reduction ``mean_times_classes`` (element mean × A = Σ/B).
- ``nlvr2``: two rows per example (the sentence with the left, then the right image); the two pooled
  vectors are concatenated, ``in = 2H``, ``num_labels = 2``; task loss cross-entropy mean over B;
  KL reduction ``mean`` (``F.kl_div``'s default ``'mean'`` over ``[B, 2]`` = Σ/(2B), no factor).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from villa_plugin.adversarial.losses import KL_REDUCTIONS
from villa_plugin.backbones.lxmert.config import LxmertConfig
from villa_plugin.backbones.lxmert.modeling import init_lxmert_weights
from villa_plugin.common.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LxmertHeadSpec:
    """``rows_per_example``: trunk rows pooled into one example; ``kl_reduction``: a key of
    ``villa_plugin.adversarial.losses.KL_REDUCTIONS``; ``losses``: the task loss specs;
    ``fixed_labels``: the label count the head requires (None: any)."""

    name: str
    rows_per_example: int
    kl_reduction: str
    losses: List[Any]
    fixed_labels: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f'LXMERT head "{self.name}": unknown kl_reduction "{self.kl_reduction}"')


LXMERT_HEADS: Dict[str, LxmertHeadSpec] = {
    "vqa": LxmertHeadSpec("vqa", 1, "mean_times_classes", ["logit_bce"]),
    "gqa": LxmertHeadSpec("gqa", 1, "mean_times_classes", ["logit_bce"]),
    "nlvr2": LxmertHeadSpec(
        "nlvr2", 2, "mean", [{"type": "cross_entropy", "params": {"ignore_index": -1}}], fixed_labels=2
    ),
}


def get_lxmert_head(name: str) -> LxmertHeadSpec:
    """The head spec called ``name`` (ConfigError listing the known heads otherwise)."""
    if name not in LXMERT_HEADS:
        raise ConfigError(f'Unknown LXMERT head "{name}"; known heads: {sorted(LXMERT_HEADS)}.')
    return LXMERT_HEADS[name]


class LxmertLogitHead(nn.Sequential):
    """The official ``logit_fc``; ``forward`` takes the pooled rows ``[R, H]`` and concatenates each
    example's ``rows_per_example`` consecutive rows first (NLVR2: ``view(-1, 2H)``)."""

    def __init__(self, config: LxmertConfig, num_labels: int, rows_per_example: int = 1):
        hidden = config.hidden_size
        super().__init__(
            nn.Linear(hidden * rows_per_example, hidden * 2),
            nn.GELU(),
            nn.LayerNorm(hidden * 2, eps=config.layer_norm_eps),
            nn.Linear(hidden * 2, num_labels),
        )
        self.rows_per_example = rows_per_example
        self.apply(lambda module: init_lxmert_weights(module, config.initializer_range))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        rows, hidden = pooled.shape
        if rows % self.rows_per_example:
            raise ValueError(
                f"This LXMERT head pools {self.rows_per_example} rows per example but the batch has {rows} rows."
            )
        return super().forward(pooled.reshape(rows // self.rows_per_example, hidden * self.rows_per_example))


def build_lxmert_head(spec: LxmertHeadSpec, config: LxmertConfig, num_labels: int) -> LxmertLogitHead:
    """The head module for ``spec``; a wrong ``num_labels`` is a ConfigError."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ConfigError(f"LXMERT head {spec.name}: num_labels must be a positive integer, got {num_labels!r}.")
    if spec.fixed_labels is not None and num_labels != spec.fixed_labels:
        raise ConfigError(f"LXMERT head {spec.name} predicts {spec.fixed_labels} classes; set num_labels: {spec.fixed_labels}.")
    return LxmertLogitHead(config, num_labels, spec.rows_per_example)


__all__ = ["LXMERT_HEADS", "LxmertHeadSpec", "LxmertLogitHead", "build_lxmert_head", "get_lxmert_head"]
