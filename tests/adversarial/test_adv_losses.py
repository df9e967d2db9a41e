"""Symmetric KL, the per-task reductions and the registered losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from villa_plugin.adversarial.losses import reduce_kl, symmetric_kl
from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import registry


def official_symkl(z, zc):
    p_c, logp_c = F.softmax(zc, -1), F.log_softmax(zc, -1)
    return F.kl_div(F.log_softmax(z, -1), p_c, reduction="none") + F.kl_div(logp_c, F.softmax(z, -1), reduction="none")


def test_matches_the_official_formula_and_its_gradients():
    torch.manual_seed(0)
    z, zc = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    ours = symmetric_kl(z, zc)
    theirs = official_symkl(z, zc)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    g_ours = torch.autograd.grad(ours.sum(), [z, zc])
    g_theirs = torch.autograd.grad(theirs.sum(), [z, zc])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hand_values_on_two_classes():
    # p_c = (0.5, 0.5), p = softmax(log 3, 0) = (0.75, 0.25): KL sum = Σ (p_c − p)(log p_c − log p)
    z = torch.tensor([[torch.log(torch.tensor(3.0)).item(), 0.0]])
    kl = symmetric_kl(z, torch.zeros(1, 2))
    expected = torch.tensor([[(0.5 - 0.75) * (torch.log(torch.tensor(0.5 / 0.75))), (0.5 - 0.25) * torch.log(torch.tensor(2.0))]])
    torch.testing.assert_close(kl, expected)


def test_zero_for_equal_logits_and_fp32_for_half_inputs():
    z = torch.randn(3, 4).bfloat16()
    kl = symmetric_kl(z, z.clone())
    assert kl.dtype == torch.float32 and (kl == 0).all()


def test_reductions_on_hand_tensors():
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert reduce_kl(kl, "mean_times_classes").item() == pytest.approx(21 / 6 * 3)  # VQA / VE
    assert reduce_kl(kl, "sum_classes_mean").item() == pytest.approx((6 + 15) / 2)  # NLVR2
    assert reduce_kl(kl, "mean").item() == pytest.approx(21 / 6)  # VCR: half of sum-over-2-classes
    two = torch.tensor([[1.0, 3.0]])
    assert reduce_kl(two, "mean").item() == pytest.approx(reduce_kl(two, "sum_classes_mean").item() / 2)


def test_unknown_reduction_lists_the_choices():
    with pytest.raises(ConfigError, match="mean_times_classes, sum_classes_mean, mean"):
        reduce_kl(torch.ones(1, 2), "batchmean")


def test_registered_symmetric_kl_loss():
    loss = registry.get_loss_class("symmetric_kl")(reduction="sum_classes_mean")
    z, zc = torch.randn(3, 2), torch.randn(3, 2)
    value = loss({}, {"scores": z, "clean_scores": zc})
    torch.testing.assert_close(value, official_symkl(z, zc).sum(1).mean())
    with pytest.raises(KeyError, match="clean_scores"):
        loss({}, {"scores": z})
    with pytest.raises(ConfigError):
        registry.get_loss_class("symmetric_kl")(reduction="nope")


def test_villa_adversarial_is_task_plus_alpha_kl():
    loss = registry.get_loss_class("villa_adversarial")(task={"type": "cross_entropy", "params": {}}, kl_weight=2.0, reduction="mean")
    z, zc = torch.randn(3, 2), torch.randn(3, 2)
    targets = torch.tensor([0, 1, 1])
    task = F.cross_entropy(z, targets)
    with_kl = loss({"targets": targets}, {"scores": z, "clean_scores": zc})
    torch.testing.assert_close(with_kl, task + 2.0 * official_symkl(z, zc).mean())
    torch.testing.assert_close(loss({"targets": targets}, {"scores": z}), task)
    with pytest.raises(ConfigError, match="task"):
        registry.get_loss_class("villa_adversarial")(task=3)
