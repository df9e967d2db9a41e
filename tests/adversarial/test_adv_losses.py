"""Symmetric KL and the per-task reductions; the KL is not a registered (YAML) loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from villa_plugin.adversarial.losses import reduce_kl, symmetric_kl
from villa_plugin.common.errors import ConfigError


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


@pytest.mark.parametrize("name", ["symmetric_kl", "villa_adversarial"])
def test_the_kl_is_not_a_yaml_loss(name):
    # these losses read model_output["clean_scores"], which no model writes: one raised a KeyError at
    # the first batch, the other silently returned the task loss. The engine adds the KL instead.
    from villa_plugin.losses import Losses
    from villa_plugin.registry import RegistryError

    with pytest.raises(RegistryError, match=name):
        Losses([{"type": name, "params": {}}])
