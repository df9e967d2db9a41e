"""Metrics accumulated over a split, with their state in tensors so ranks can sum it.

This module holds the metric base class, the task-agnostic ``accuracy`` and the
``evaluation.metrics`` parser; task metrics live in their task's package
(``villa_plugin/tasks/<task>/metrics.py``) and register themselves.

``evaluation.metrics: [name | {type, key, params, datasets}]``; each value is reported as
``<split>/<dataset>/<key>`` (``key`` defaults to the type).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import registry


class BaseMetric:
    """``reset()`` -> ``update(batch, output)`` per batch -> ``reduce(all_reduce_sum)`` -> ``compute()``.

    Subclasses list their sums in ``state_names``; each is a float64 tensor, so a distributed run
    sums them across ranks with one collective before ``compute``.
    """

    state_names: tuple = ()

    def __init__(self, **params: Any):
        self.params = params
        self.reset()

    def reset(self) -> None:
        for name in self.state_names:
            setattr(self, name, torch.zeros((), dtype=torch.float64))

    def update(self, batch, output: Dict[str, Any]) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None) -> None:
        """Sum every state tensor across ranks (in one collective) in place."""
        if not self.state_names:
            return
        packed = torch.stack([getattr(self, n).to(torch.float64).reshape(()) for n in self.state_names])
        if device is not None:
            packed = packed.to(device)
        packed = all_reduce_sum(packed)
        for i, name in enumerate(self.state_names):
            setattr(self, name, packed[i].detach().cpu())

    def _add(self, name: str, value: torch.Tensor) -> None:
        setattr(self, name, getattr(self, name) + value.detach().to("cpu", torch.float64))


@registry.register_metric("accuracy")
class Accuracy(BaseMetric):
    """Fraction of argmax predictions equal to the target class.

    Targets are class indices ``[B]`` or one-hot / soft rows ``[B, C]`` (compared by argmax). Scores
    of shape ``[B]`` or ``[B, 1]`` are binary logits (positive when > 0).
    """

    state_names = ("correct", "total")

    def update(self, batch, output: Dict[str, Any]) -> None:
        scores = output["scores"].detach()
        targets = batch["targets"].detach().to(scores.device)
        if scores.dim() == 1 or scores.size(-1) == 1:
            predicted = (scores.reshape(-1) > 0).long()
            truth = targets.reshape(-1).round().long()
        else:
            predicted = scores.argmax(dim=-1)
            truth = targets.argmax(dim=-1) if targets.dim() == scores.dim() else targets.long()
        self._add("correct", (predicted == truth).sum())
        self._add("total", torch.tensor(predicted.numel()))

    def compute(self) -> float:
        return float(self.correct / self.total) if self.total > 0 else 0.0


@dataclass
class MetricSpec:
    """One configured metric: report ``key``, the metric type and the datasets it applies to."""

    key: str
    type: str
    params: Dict[str, Any]
    datasets: Optional[List[str]] = None

    def applies_to(self, dataset_name: str) -> bool:
        return self.datasets is None or dataset_name in self.datasets

    def build(self) -> BaseMetric:
        return registry.get_metric_class(self.type)(**self.params)


def parse_metric_specs(specs: Any) -> List[MetricSpec]:
    """``evaluation.metrics`` entries -> :class:`MetricSpec` list (unknown types fail early)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(specs):
        specs = OmegaConf.to_container(specs, resolve=True)
    parsed = []
    for spec in specs or []:
        if isinstance(spec, str):
            parsed.append(MetricSpec(key=spec, type=spec, params={}))
        elif isinstance(spec, dict) and spec.get("type"):
            datasets = spec.get("datasets")
            if isinstance(datasets, str):
                datasets = [datasets]
            parsed.append(
                MetricSpec(
                    key=str(spec.get("key") or spec["type"]),
                    type=str(spec["type"]),
                    params=dict(spec.get("params") or {}),
                    datasets=list(datasets) if datasets else None,
                )
            )
        else:
            raise ConfigError(
                f"evaluation.metrics entries must be a name or {{type, key, params, datasets}}, got {spec!r}"
            )
    for spec in parsed:
        registry.get_metric_class(spec.type)  # RegistryError now rather than after training
    return parsed
