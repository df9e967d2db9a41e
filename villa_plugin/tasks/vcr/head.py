"""VCR head ``vcr`` (UNITER's ``UniterForVisualCommonsenseReasoning``).

``vcr_output`` = Seq(Linear(H, 2H), ReLU, LayerNorm(2H), Linear(2H, 2)) on the pooler, applied to
each (question, candidate) row: logits ``[rows, 2]``, class 1 = "this candidate is right". The
metrics and prediction writer read ``logit[:, 1]`` per candidate and reshape it per question.

Embeddings grow (``embedding_growth``) before task training (and before loading fine-tuned /
2nd-stage checkpoints, after loading pretrained ``uniter-*`` / ``villa-*`` ones): the type table to
4 rows (0 question, 1 region, 2 answer, 3 rationale; rows 2 and 3 := row 0) and the vocabulary by
the 81 person/object tag tokens. Task loss: cross-entropy over rows (mean); VILLA's KL reduction:
``kl.mean()`` over rows and both classes (``mean``, half the sum-over-classes value).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.models.heads import TaskHead
from villa_plugin.models.trunk import EmbeddingGrowth, TrunkDims, TrunkOutput
from villa_plugin.registry import registry
from villa_plugin.tasks.vqa.head import two_layer_classifier

VCR_TYPE_ROWS = 4
VCR_TYPE_COPY = {2: 0, 3: 0}
VCR_NUM_SPECIAL_TOKENS = 81  # person/object tags appended to the vocabulary


@registry.register_head("vcr")
class VcrHead(TaskHead):
    """``vcr_output`` on the pooled output of each (question, candidate) row: ``[rows, 2]``."""

    module_name = "vcr_output"
    kl_reduction = "mean"
    embedding_growth = EmbeddingGrowth(type_rows=VCR_TYPE_ROWS, type_copy_from=VCR_TYPE_COPY,
                                       extra_words=VCR_NUM_SPECIAL_TOKENS)

    def __init__(self, dims: TrunkDims, num_labels: int, head_config: Dict[str, Any]):
        super().__init__(dims, num_labels, head_config)
        if num_labels != 2:
            raise ConfigError(f"The vcr head scores each candidate row with 2 logits: set num_labels: 2 (got {num_labels}).")
        self.vcr_output = two_layer_classifier(dims, num_labels, nn.ReLU())

    def forward(self, trunk: TrunkOutput, batch: Any) -> torch.Tensor:
        return self.vcr_output(trunk.require_pooled("vcr"))


__all__ = ["VcrHead", "VCR_TYPE_ROWS", "VCR_TYPE_COPY", "VCR_NUM_SPECIAL_TOKENS"]
