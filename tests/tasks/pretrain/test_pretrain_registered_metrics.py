"""The registered pre-training metrics: each equals PretrainValidation's result for its task, ignores
other tasks' batches and sums across ranks; the chance metrics are majority baselines."""
from __future__ import annotations

import pytest
import torch

from villa_plugin.registry import registry
from villa_plugin.tasks.pretrain.metrics import PretrainValidation


def _mlm(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((3, 6), -1)
    labels[0, 1], labels[1, 2], labels[1, 4], labels[2, 3] = 5, 5, 7, 5
    return {"task": "mlm", "txt_labels": labels}, {"task": "mlm", "scores": torch.randn(4, 10, generator=g)}


def test_registered_metric_equals_the_validation_definition_and_sums_over_ranks():
    (b0, o0), (b1, o1) = _mlm(0), _mlm(1)
    reference = PretrainValidation()
    reference.update("mlm", o0, b0)
    reference.update("mlm", o1, b1)
    ranks = []
    for batch, output in ((b0, o0), (b1, o1)):
        metric = registry.get_metric_class("mlm_accuracy")()
        metric.update(batch, output)
        metric.update({"task": "itm", "targets": torch.tensor([1, 0])}, {"task": "itm", "scores": torch.randn(2, 2)})
        ranks.append(metric)
    total = sum(torch.stack([getattr(m, n) for n in m.state_names]) for m in ranks)
    for metric in ranks:  # a two-rank all-reduce
        metric.reduce(lambda packed: total)
        assert metric.compute() == pytest.approx(reference.results()["mlm_accuracy"])
    loss = registry.get_metric_class("mlm_loss")()
    loss.update(b0, o0)
    loss.update(b1, o1)
    assert loss.compute() == pytest.approx(reference.results()["mlm_loss"])


def test_chance_metrics_are_the_majority_share():
    batch, output = _mlm(0)
    chance = registry.get_metric_class("mlm_chance")()
    chance.update(batch, output)
    chance.reduce(lambda packed: packed * 2)  # two identical ranks
    assert chance.compute() == pytest.approx(3 / 4)  # label 5 on 3 of the 4 masked tokens
    itm = registry.get_metric_class("itm_chance")()
    itm.update({"task": "itm", "targets": torch.tensor([1, 0, 1, 1, 1])}, {"task": "itm", "scores": torch.randn(5, 2)})
    assert itm.compute() == pytest.approx(0.8)
    assert registry.get_metric_class("itm_chance")().compute() != registry.get_metric_class("itm_chance")().compute()  # nan
