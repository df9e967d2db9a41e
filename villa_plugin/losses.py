"""Losses as MMF builds them: ``losses: [name | {type, params}]`` -> one registered module each.

A registered loss is an ``nn.Module`` called as ``loss(sample_list, model_output) -> Tensor``.
:class:`Losses` runs all of them and names each value ``<dataset_type>/<dataset_name>/<loss>``.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import registry


def _parse_spec(spec: Any) -> Tuple[str, Dict[str, Any]]:
    """``"name"`` or ``{type, params}`` -> (name, params as a plain dict)."""
    if isinstance(spec, str):
        return spec, {}
    if hasattr(spec, "get") and spec.get("type"):
        params = spec.get("params") or {}
        if hasattr(params, "items"):
            params = {str(k): _plain(v) for k, v in params.items()}
        return str(spec.get("type")), dict(params)
    raise ConfigError(
        f"A loss entry must be a name or a mapping with a 'type' key (and optional 'params'), got {spec!r}. "
        f"Example: losses: [logit_bce] or losses: [{{type: cross_entropy, params: {{}}}}]"
    )


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


class Losses(nn.Module):
    """All configured losses of a model; ``forward`` returns ``{"split/dataset/name": Tensor}``."""

    def __init__(self, specs: Iterable[Any]):
        super().__init__()
        self.names: List[str] = []
        self.losses = nn.ModuleList()
        for spec in specs or []:
            name, params = _parse_spec(spec)
            loss_cls = registry.get_loss_class(name)  # RegistryError for unknown names
            self.names.append(name)
            self.losses.append(loss_cls(**params))

    def __len__(self) -> int:
        return len(self.names)

    def forward(self, sample_list, model_output: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        dataset_type = sample_list.get("dataset_type", "train")
        dataset_name = sample_list.get("dataset_name", "dataset")
        return {
            f"{dataset_type}/{dataset_name}/{name}": loss(sample_list, model_output)
            for name, loss in zip(self.names, self.losses)
        }


@registry.register_loss("logit_bce")
class LogitBinaryCrossEntropy(nn.Module):
    """BCE with logits, mean over elements × number of labels (= sum over labels, mean over batch).

    This is UNITER/VILLA's VQA loss and MMF's ``logit_bce``.
    """

    def forward(self, sample_list, model_output: Dict[str, Any]) -> torch.Tensor:
        scores = model_output["scores"].float()
        targets = sample_list["targets"].to(scores.dtype)
        if scores.shape != targets.shape:
            raise ValueError(f"logit_bce needs scores and targets of the same shape, got {tuple(scores.shape)} and {tuple(targets.shape)}")
        loss = F.binary_cross_entropy_with_logits(scores, targets, reduction="mean")
        return loss * targets.size(-1) if targets.dim() > 1 else loss


@registry.register_loss("cross_entropy")
class CrossEntropy(nn.Module):
    """``nn.CrossEntropyLoss(**params)(scores, targets)``; targets are class indices or probabilities."""

    def __init__(self, **params: Any):
        super().__init__()
        self.loss = nn.CrossEntropyLoss(**params)

    def forward(self, sample_list, model_output: Dict[str, Any]) -> torch.Tensor:
        scores = model_output["scores"].float()
        targets = sample_list["targets"]
        if targets.is_floating_point():
            targets = targets.to(scores.dtype)
        return self.loss(scores, targets)
