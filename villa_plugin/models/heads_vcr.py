"""VCR head ``vcr`` (UNITER's ``UniterForVisualCommonsenseReasoning``).

``vcr_output`` = Seq(Linear(H, 2H), ReLU, LayerNorm(2H), Linear(2H, 2)) on the pooler, applied to
each (question, candidate) row: logits ``[rows, 2]``, class 1 = "this candidate is right". The
metrics and prediction writer read ``logit[:, 1]`` per candidate and reshape it per question.

Embeddings grow before task training (and before loading fine-tuned / 2nd-stage checkpoints,
after loading pretrained ``uniter-*`` / ``villa-*`` ones): the type table to 4 rows (0 question,
1 region, 2 answer, 3 rationale; rows 2 and 3 := row 0) and the vocabulary by the 81 person/object
tag tokens. Task loss: cross-entropy over rows (mean); VILLA's KL reduction: ``kl.mean()`` over rows
and both classes (``mean``, half the sum-over-classes value).
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.models.heads import HeadSpec, register_head
from villa_plugin.backbones.uniter.model import UniterConfig

VCR_TYPE_ROWS = 4
VCR_TYPE_COPY = {2: 0, 3: 0}
VCR_NUM_SPECIAL_TOKENS = 81  # person/object tags appended to the vocabulary


def build_vcr_output(config: UniterConfig, num_labels: int, head_config: Dict[str, Any]) -> nn.Module:
    if num_labels != 2:
        raise ConfigError(f"The vcr head scores each candidate row with 2 logits: set num_labels: 2 (got {num_labels}).")
    hidden = config.hidden_size
    return nn.Sequential(
        nn.Linear(hidden, hidden * 2),
        nn.ReLU(),
        nn.LayerNorm(hidden * 2, eps=config.layer_norm_eps),
        nn.Linear(hidden * 2, num_labels),
    )


VCR_HEAD = register_head(HeadSpec(name="vcr", module_name="vcr_output", build=build_vcr_output, kl_reduction="mean"))

__all__ = ["VCR_HEAD", "VCR_TYPE_ROWS", "VCR_TYPE_COPY", "VCR_NUM_SPECIAL_TOKENS"]
