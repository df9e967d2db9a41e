"""VQA's metric ``vqa_accuracy`` (UNITER's soft score)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from villa_plugin.metrics import BaseMetric
from villa_plugin.registry import registry


@registry.register_metric("vqa_accuracy")
class VQAAccuracy(BaseMetric):
    """UNITER's soft VQA score: ``Σ onehot(argmax(scores)) · targets / N``.

    Unlike MMF, index 0 is not masked: UNITER's answer 0 is a real answer.
    """

    state_names = ("score", "total")

    def update(self, batch, output: Dict[str, Any]) -> None:
        scores = output["scores"].detach()
        targets = batch["targets"].detach().to(scores.device, torch.float64)
        predicted = scores.argmax(dim=-1, keepdim=True)
        self._add("score", targets.gather(-1, predicted).sum())
        self._add("total", torch.tensor(scores.size(0)))

    def compute(self) -> float:
        return float(self.score / self.total) if self.total > 0 else 0.0
