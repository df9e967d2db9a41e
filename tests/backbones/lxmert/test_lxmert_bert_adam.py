"""BertAdam against the update rule of lxmert.md §7, written out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from villa_plugin.backbones.lxmert.optimization import BertAdam, warmup_linear


def _by_hand(p0, grads, lr, warmup, t_total, wd=0.01, b1=0.9, b2=0.999, e=1e-6):
    p, m, v = p0.clone().double(), torch.zeros_like(p0).double(), torch.zeros_like(p0).double()
    for step, g in enumerate(grads):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = m / (v.sqrt() + e) + wd * p  # no bias correction; decay on every parameter
        x = step / t_total
        s = x / warmup if x < warmup else max((x - 1) / (warmup - 1), 0.0)
        p = p - lr * s * u
    return p


def test_updates_follow_the_reference_rule():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    bias = torch.nn.Parameter(torch.randn(4))  # decayed too
    unused = torch.nn.Parameter(torch.randn(2))  # .grad None: untouched, not decayed
    start = {n: t.detach().clone() for n, t in [("w", weight), ("b", bias), ("u", unused)]}
    grads = {"w": [torch.randn(3, 4) for _ in range(5)], "b": [torch.randn(4) for _ in range(5)]}
    opt = BertAdam([weight, bias, unused], lr=0.1, warmup=0.2, t_total=10)
    for step in range(5):
        weight.grad, bias.grad = grads["w"][step], grads["b"][step]
        opt.step()
        if step == 0:  # lr 0 on the first update (step counted from 0)
            assert torch.equal(weight, start["w"]) and torch.equal(bias, start["b"])
    assert torch.allclose(weight.double(), _by_hand(start["w"], grads["w"], 0.1, 0.2, 10), rtol=1e-6, atol=1e-7)
    assert torch.allclose(bias.double(), _by_hand(start["b"], grads["b"], 0.1, 0.2, 10), rtol=1e-6, atol=1e-7)
    assert torch.equal(unused, start["u"]) and unused not in opt.state


def test_schedule_and_constant_lr():
    assert [warmup_linear(x, 0.1) for x in (0.0, 0.05, 0.1, 0.55, 1.0, 1.2)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0])
    p = torch.nn.Parameter(torch.ones(2))
    opt = BertAdam([p], lr=0.5, t_total=-1, weight_decay=0.0)
    p.grad = torch.ones(2)
    opt.step()  # no schedule: the full lr at once; u = 0.1 / (sqrt(0.001) + 1e-6)
    assert torch.allclose(p, torch.full((2,), 1 - 0.5 * 0.1 / (math.sqrt(0.001) + 1e-6)))


def test_bad_arguments_are_rejected():
    p = [torch.nn.Parameter(torch.ones(1))]
    for kwargs in ({"lr": -1.0}, {"lr": 1.0, "warmup": 1.0}, {"lr": 1.0, "t_total": 0}, {"lr": 1.0, "b2": 1.0}):
        with pytest.raises(ValueError):
            BertAdam(p, **kwargs)
