"""Task heads on top of the UNITER trunk, selected by name (``model_config.<model>.head``).

A head is a :class:`HeadSpec`: the attribute name of its module on the model (which is also the
prefix of its checkpoint keys, e.g. ``vqa_output.0.weight``), a builder, the name of the KL
reduction VILLA uses for the task (villa-algorithm.md §4) and a forward function. Later tasks add a
head with ``register_head(HeadSpec(...))``; the registered models need no change.

KL reduction names (of the elementwise ``[rows, C]`` symmetric KL; implemented by
``villa_plugin.adversarial.losses.KL_REDUCTIONS``): ``mean_times_classes`` = ``kl.mean() * C``
(VQA, SNLI-VE), ``sum_classes_mean`` = ``kl.sum(1).mean()`` (NLVR2), ``mean`` = ``kl.mean()`` (VCR).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import torch
from torch import nn

from villa_plugin.adversarial.losses import KL_REDUCTIONS
from villa_plugin.common.errors import ConfigError
from villa_plugin.backbones.uniter.model import UniterConfig, UniterModel, init_uniter_weights
from villa_plugin.registry import suggest


def pooled_head_forward(
    head: nn.Module, uniter: UniterModel, sequence_output: torch.Tensor, batch: Any
) -> torch.Tensor:
    """The common head input: the trunk pooler on ``[CLS]`` (``tanh(dense(h[:, 0]))``), then the head."""
    return head(uniter.pooler(sequence_output))


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """How to build and run one task head.

    - ``module_name``: attribute on the model; prefix of the head's checkpoint keys.
    - ``build(config, num_labels, head_config) -> nn.Module`` (weights are re-initialised afterwards
      with the UNITER init, as the reference heads do).
    - ``kl_reduction``: a key of ``villa_plugin.adversarial.losses.KL_REDUCTIONS``.
    - ``forward(head, uniter, sequence_output, batch) -> logits``.
    - ``uses_pooler``: False for heads that read token outputs directly; the model then freezes the
      trunk pooler so that DDP / ZeRO need no ``find_unused_parameters``.
    """

    name: str
    module_name: str
    build: Callable[[UniterConfig, int, Dict[str, Any]], nn.Module]
    kl_reduction: str
    forward: Callable[[nn.Module, UniterModel, torch.Tensor, Any], torch.Tensor] = pooled_head_forward
    uses_pooler: bool = True

    def __post_init__(self) -> None:
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(
                f'Head "{self.name}": kl_reduction must be one of {sorted(KL_REDUCTIONS)}, got "{self.kl_reduction}"'
            )


HEADS: Dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec, override: bool = False) -> HeadSpec:
    """Add a head under ``spec.name``; a second registration of a name needs ``override=True``."""
    if spec.name in HEADS and HEADS[spec.name] is not spec and not override:
        raise ValueError(f'Head "{spec.name}" is already registered; pass override=True to replace it.')
    HEADS[spec.name] = spec
    return spec


def get_head(name: str) -> HeadSpec:
    """The registered head called ``name`` (ConfigError listing the known heads otherwise)."""
    if name not in HEADS:
        raise ConfigError(
            f'Unknown head "{name}" (model_config.<model>.head).{suggest(name, HEADS)} Known heads: {sorted(HEADS)}.'
        )
    return HEADS[name]


def build_head_module(spec: HeadSpec, config: UniterConfig, num_labels: int, head_config: Dict[str, Any]) -> nn.Module:
    """Build the head's module and apply the UNITER init (N(0, range), bias 0, LayerNorm 1/0)."""
    module = spec.build(config, num_labels, head_config)
    module.apply(lambda m: init_uniter_weights(m, config.initializer_range))
    return module


# ----------------------------------------------------------------------------------------------
# VQA: vqa_output = Seq(Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, num_answers)) on the pooler
# ----------------------------------------------------------------------------------------------
def build_vqa_output(config: UniterConfig, num_labels: int, head_config: Dict[str, Any]) -> nn.Module:
    hidden = config.hidden_size
    return nn.Sequential(
        nn.Linear(hidden, hidden * 2),
        nn.GELU(),  # erf form, as the reference's GELU
        nn.LayerNorm(hidden * 2, eps=config.layer_norm_eps),
        nn.Linear(hidden * 2, num_labels),
    )


VQA_HEAD = register_head(
    HeadSpec(name="vqa", module_name="vqa_output", build=build_vqa_output, kl_reduction="mean_times_classes")
)
