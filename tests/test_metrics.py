"""Metrics: accuracy, rank reduction, config parsing (task metrics are tested in tests/tasks/<task>/)."""
from __future__ import annotations

import pytest
import torch

from villa_plugin.common.errors import ConfigError
from villa_plugin.metrics import Accuracy, parse_metric_specs
from villa_plugin.tasks.vqa.metrics import VQAAccuracy
from villa_plugin.registry import RegistryError


def test_accuracy_with_indices_one_hot_and_binary_logits():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    metric = Accuracy()
    metric.update({"targets": torch.tensor([1, 1, 1])}, {"scores": scores})
    metric.update({"targets": torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])}, {"scores": scores})
    assert metric.compute() == pytest.approx(4 / 6)
    binary = Accuracy()
    binary.update({"targets": torch.tensor([1, 0, 0])}, {"scores": torch.tensor([2.0, -1.0, 0.5])})
    assert binary.compute() == pytest.approx(2 / 3)


def test_reduce_sums_state_across_ranks_in_one_call():
    metric = VQAAccuracy()
    metric.update({"targets": torch.tensor([[1.0, 0.0]])}, {"scores": torch.tensor([[2.0, 1.0]])})
    calls = []

    def fake_all_reduce(tensor):  # another rank saw 3 examples with score 0.5
        calls.append(tensor.clone())
        return tensor + torch.tensor([0.5, 3.0], dtype=tensor.dtype)

    metric.reduce(fake_all_reduce)
    assert len(calls) == 1 and calls[0].tolist() == [1.0, 1.0]
    assert metric.compute() == pytest.approx(1.5 / 4)


def test_parse_metric_specs():
    specs = parse_metric_specs(["accuracy", {"type": "vqa_accuracy", "key": "soft", "datasets": "vqa2"}])
    assert [(s.key, s.type, s.datasets) for s in specs] == [("accuracy", "accuracy", None), ("soft", "vqa_accuracy", ["vqa2"])]
    assert specs[1].applies_to("vqa2") and not specs[1].applies_to("nlvr2")
    assert isinstance(specs[1].build(), VQAAccuracy)
    with pytest.raises(RegistryError, match="accuracy"):
        parse_metric_specs(["acuracy"])
    with pytest.raises(ConfigError):
        parse_metric_specs([{"key": "x"}])
