"""Task heads: a registry kind (``@registry.register_head(name)``), selected by ``model_config.<model>.head``.

A head is a :class:`TaskHead` subclass. It is built from the trunk's :class:`TrunkDims`, the
configured ``num_labels`` and the model config (``head_config``), and maps a :class:`TrunkOutput`
(plus the batch, for task fields such as retrieval's candidates) to scores. It never receives the
trunk module. Class attributes declare what the model needs to know:

- ``module_name``: the prefix of the head's keys in MMF checkpoints (``vqa_output`` for
  ``mmf``'s ``classifier.*``) and the name shown in load reports;
- ``kl_reduction``: the name of VILLA's KL reduction for the task (a key of
  ``villa_plugin.adversarial.losses.KL_REDUCTIONS``): ``mean_times_classes`` = ``kl.mean() * C``
  (VQA, SNLI-VE), ``sum_classes_mean`` = ``kl.sum(1).mean()`` (NLVR2, RE, retrieval), ``mean`` =
  ``kl.mean()`` (VCR);
- ``uses_pooler``: False for heads that read token outputs only; the model then passes
  ``pooled=None`` and freezes the trunk pooler, so DDP / ZeRO need no ``find_unused_parameters``;
- ``embedding_growth``: an :class:`EmbeddingGrowth` when the head needs more type rows or words.

An instance sets ``label_width`` when its scores are one column per label of a dataset-defined
vocabulary (VQA's answers): the trainer checks it against the targets' width at set-up.

The head's children are registered on the model under their own names, so the state-dict keys are
the official top-level ones (``vqa_output.0.weight``, ``attn1.in_proj_weight``, ``rank_output.bias``).
The model re-initialises a new head with the trunk's init (N(0, initializer_range), bias 0,
LayerNorm 1/0), as the reference heads are. Because the head object itself is not a submodule of the
model, its forward must not read ``self.training`` (its children's modes are kept right).
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional

import torch
from torch import nn

from villa_plugin.adversarial.losses import KL_REDUCTIONS
from villa_plugin.common.errors import ConfigError
from villa_plugin.models.trunk import EmbeddingGrowth, TrunkDims, TrunkOutput
from villa_plugin.registry import RegistryError, registry


class TaskHead(nn.Module):
    """Base class of the registered heads (see the module docstring)."""

    module_name: ClassVar[str] = ""
    kl_reduction: ClassVar[str] = ""
    uses_pooler: ClassVar[bool] = True
    embedding_growth: ClassVar[Optional[EmbeddingGrowth]] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kl_reduction and cls.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(
                f"{cls.__name__}.kl_reduction must be one of {sorted(KL_REDUCTIONS)}, got {cls.kl_reduction!r}"
            )

    def __init__(self, dims: TrunkDims, num_labels: int, head_config: Dict[str, Any]):
        super().__init__()
        self.label_width: Optional[int] = None

    def forward(self, trunk: TrunkOutput, batch: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def get_head_class(name: str) -> type:
    """The registered head class ``name``; a ConfigError naming the key and the known heads otherwise."""
    try:
        head_cls = registry.get_head_class(name)
    except RegistryError as err:
        raise ConfigError(f"model_config.<model>.head: {err}") from err
    if not (isinstance(head_cls, type) and issubclass(head_cls, TaskHead)):
        raise ConfigError(f'Head "{name}" is registered as {head_cls!r}, which is no TaskHead subclass.')
    return head_cls


def build_head(head_cls: type, dims: TrunkDims, num_labels: int, head_config: Dict[str, Any],
               init_weights) -> TaskHead:
    """Build ``head_cls`` and apply ``init_weights(module, initializer_range)`` to every submodule."""
    head = head_cls(dims, num_labels, head_config)
    head.apply(lambda m: init_weights(m, dims.initializer_range))
    return head


__all__ = ["TaskHead", "get_head_class", "build_head"]
