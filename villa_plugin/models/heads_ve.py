"""SNLI-VE head ``ve`` (UNITER's ``UniterForVisualEntailment``): the VQA head with 3 outputs.

``vqa_output`` = Seq(Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, 3)) on the pooler; the module
keeps VQA's name because the released VE checkpoints do (``vqa_output.3.weight`` [3, 2H]). Labels:
0 contradiction, 1 entailment, 2 neutral. Task loss: ``logit_bce`` on one-hot targets (BCE mean × 3,
not cross-entropy); VILLA's KL reduction: ``kl.mean() * 3`` (``mean_times_classes``).
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.models.heads import HeadSpec, build_vqa_output, register_head
from villa_plugin.backbones.uniter.model import UniterConfig

VE_LABELS = ("contradiction", "entailment", "neutral")


def build_ve_output(config: UniterConfig, num_labels: int, head_config: Dict[str, Any]) -> nn.Module:
    if num_labels != len(VE_LABELS):
        raise ConfigError(f"The ve head has {len(VE_LABELS)} outputs {list(VE_LABELS)}: set num_labels: 3 (got {num_labels}).")
    return build_vqa_output(config, num_labels, head_config)


VE_HEAD = register_head(
    HeadSpec(name="ve", module_name="vqa_output", build=build_ve_output, kl_reduction="mean_times_classes")
)

__all__ = ["VE_HEAD", "VE_LABELS"]
