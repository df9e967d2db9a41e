"""WRA's IPOT against exact optimal transport on tiny problems, and the padded batch against per-example runs."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrain_testlib import cosine_cost_alone, ipot_alone
from villa_plugin.tasks.pretrain.ot import cosine_cost, ipot, optimal_transport_distance


def exact_uniform_ot(cost: torch.Tensor) -> float:
    """Exact OT cost between uniform marginals on ``[n_t, n_v]``: with N = lcm(n_t, n_v), replicate each
    text point N/n_t times and each region N/n_v times (the same measures); an optimal assignment of
    the N points is then an optimal plan (Birkhoff), found by brute force over permutations."""
    n_t, n_v = cost.shape
    n = math.lcm(n_t, n_v)
    big = cost.repeat_interleave(n // n_t, dim=0).repeat_interleave(n // n_v, dim=1).double()  # [N, N]
    n = big.size(0)
    best = min(sum(big[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n)))
    return best / n


def _points(seed, n, dim=4):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_t, n_v, seed", [(3, 3, 0), (3, 3, 1), (2, 3, 2), (3, 2, 3), (1, 4, 4)])
def test_ipot_reaches_the_exact_transport_cost(n_t, n_v, seed):
    cost = cosine_cost_alone(_points(seed, n_t), _points(seed + 100, n_v))
    none_t, none_v = torch.zeros(1, n_t, dtype=torch.bool), torch.zeros(1, n_v, dtype=torch.bool)
    plan = ipot(cost[None], none_t, none_v)[0]  # [n_v, n_t]
    ipot_cost = (cost * plan.t()).sum().item()
    exact = exact_uniform_ot(cost)
    assert ipot_cost >= exact - 1e-6  # IPOT's plan is feasible (up to its marginal error): never below the optimum
    assert ipot_cost == pytest.approx(exact, abs=2e-3)
    torch.testing.assert_close(plan.sum(0), torch.full((n_t,), 1 / n_t), atol=1e-6, rtol=0)  # text marginal exact
    torch.testing.assert_close(plan.sum(1), torch.full((n_v,), 1 / n_v), atol=2e-3, rtol=0)


def test_ipot_on_a_permutation_problem_finds_the_permutation():
    """Costs 0 on a permutation, 1 elsewhere: the plan concentrates 1/3 on the permutation."""
    cost = torch.ones(3, 3)
    perm = [2, 0, 1]
    for t, v in enumerate(perm):
        cost[t, v] = 0.0
    plan = ipot(cost[None], torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool))[0]
    expected = torch.zeros(3, 3)
    for t, v in enumerate(perm):
        expected[v, t] = 1 / 3
    torch.testing.assert_close(plan, expected, atol=1e-4, rtol=0)


def test_padded_batch_equals_unpadded_examples():
    lens = [(3, 5), (6, 2), (1, 4)]
    max_t, max_v = 6, 5
    txt = torch.randn(3, max_t, 8, generator=torch.Generator().manual_seed(0))
    img = torch.randn(3, max_v, 8, generator=torch.Generator().manual_seed(1))
    txt_pad = torch.arange(max_t)[None] >= torch.tensor([t for t, _ in lens])[:, None]
    img_pad = torch.arange(max_v)[None] >= torch.tensor([v for _, v in lens])[:, None]
    cost = cosine_cost(txt, img).masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0)
    plans = ipot(cost, txt_pad, img_pad)
    distances = optimal_transport_distance(txt, img, txt_pad, img_pad)
    for i, (n_t, n_v) in enumerate(lens):
        alone_cost = cosine_cost_alone(txt[i, :n_t], img[i, :n_v])
        alone_plan = ipot_alone(alone_cost)
        torch.testing.assert_close(plans[i, :n_v, :n_t], alone_plan, rtol=1e-5, atol=1e-8)
        assert plans[i, n_v:].abs().sum() == 0 and plans[i, :, n_t:].abs().sum() == 0
        assert math.isclose(distances[i].item(), (alone_cost * alone_plan.t()).sum().item(), rel_tol=1e-5)


def test_distance_gradient_flows_only_through_the_cost():
    """T is detached: ∂d/∂C = Tᵀ, so d's gradient equals that of Σ C ⊙ Tᵀ with T fixed."""
    txt = torch.randn(1, 3, 4, requires_grad=True)
    img = torch.randn(1, 2, 4, requires_grad=True)
    pads = torch.zeros(1, 3, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool)
    optimal_transport_distance(txt, img, *pads).sum().backward()
    plan = ipot(cosine_cost(txt, img).detach(), *pads)
    txt2, img2 = txt.detach().clone().requires_grad_(True), img.detach().clone().requires_grad_(True)
    (cosine_cost(txt2, img2) * plan.transpose(1, 2)).sum().backward()
    torch.testing.assert_close(txt.grad, txt2.grad)
    torch.testing.assert_close(img.grad, img2.grad)
