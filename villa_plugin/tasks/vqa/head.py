"""VQA head ``vqa``: ``vqa_output`` = Seq(Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, num_answers))
on the trunk's pooled output (UNITER's ``UniterForVisualQuestionAnswering``). Task loss: ``logit_bce``
on soft scores; VILLA's KL reduction: ``kl.mean() * C`` (``mean_times_classes``)."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from villa_plugin.models.heads import TaskHead
from villa_plugin.models.trunk import TrunkDims, TrunkOutput
from villa_plugin.registry import registry


def two_layer_classifier(dims: TrunkDims, num_labels: int, activation: nn.Module) -> nn.Sequential:
    """Seq(Linear(H, 2H), activation, LayerNorm(2H), Linear(2H, num_labels)): UNITER's task MLP."""
    hidden = dims.hidden_size
    return nn.Sequential(
        nn.Linear(hidden, hidden * 2),
        activation,
        nn.LayerNorm(hidden * 2, eps=dims.layer_norm_eps),
        nn.Linear(hidden * 2, num_labels),
    )


@registry.register_head("vqa")
class VqaHead(TaskHead):
    """``vqa_output`` on the pooled output: logits ``[B, num_labels]``."""

    module_name = "vqa_output"
    kl_reduction = "mean_times_classes"

    def __init__(self, dims: TrunkDims, num_labels: int, head_config: Dict[str, Any]):
        super().__init__(dims, num_labels, head_config)
        self.label_width = num_labels  # one score per answer of the dataset's ans2label
        self.vqa_output = two_layer_classifier(dims, num_labels, nn.GELU())  # erf GELU, as the reference's

    def forward(self, trunk: TrunkOutput, batch: Any) -> torch.Tensor:
        return self.vqa_output(trunk.require_pooled("vqa"))


__all__ = ["VqaHead", "two_layer_classifier"]
