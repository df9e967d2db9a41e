"""VQA's metric: UNITER's soft score."""
import pytest
import torch

from villa_plugin.tasks.vqa.metrics import VQAAccuracy


def test_vqa_accuracy_is_the_soft_score_and_keeps_answer_zero():
    scores = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([[0.9, 0.3, 0.0], [0.0, 0.6, 1.0], [0.0, 0.0, 0.0]])
    metric = VQAAccuracy()
    metric.update({"targets": targets}, {"scores": scores})
    assert metric.compute() == pytest.approx((0.9 + 0.6 + 0.0) / 3)  # answer 0 counts (UNITER)
    metric.reset()
    assert metric.compute() == 0.0
