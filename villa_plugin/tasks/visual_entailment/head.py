"""SNLI-VE head ``ve`` (UNITER's ``UniterForVisualEntailment``): the VQA head with 3 outputs.

``vqa_output`` = Seq(Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, 3)) on the pooler; the module
keeps VQA's name because the released VE checkpoints do (``vqa_output.3.weight`` [3, 2H]). Labels:
0 contradiction, 1 entailment, 2 neutral. Task loss: ``logit_bce`` on one-hot targets (BCE mean × 3,
not cross-entropy); VILLA's KL reduction: ``kl.mean() * 3`` (``mean_times_classes``).
"""
from __future__ import annotations

from typing import Any, Dict

from villa_plugin.common.errors import ConfigError
from villa_plugin.models.trunk import TrunkDims
from villa_plugin.registry import registry
from villa_plugin.tasks.vqa.head import VqaHead

VE_LABELS = ("contradiction", "entailment", "neutral")


@registry.register_head("ve")
class VeHead(VqaHead):
    """:class:`VqaHead` with exactly 3 labels."""

    def __init__(self, dims: TrunkDims, num_labels: int, head_config: Dict[str, Any]):
        if num_labels != len(VE_LABELS):
            raise ConfigError(f"The ve head has {len(VE_LABELS)} outputs {list(VE_LABELS)}: set num_labels: 3 (got {num_labels}).")
        super().__init__(dims, num_labels, head_config)


__all__ = ["VeHead", "VE_LABELS"]
