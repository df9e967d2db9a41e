"""Perturbation primitives: init, ascent direction, projection, non-finite skip, shapes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from villa_plugin.adversarial.perturbation import (
    ascent_direction,
    ascent_step,
    init_delta,
    perturbation_masks,
    perturbation_shapes,
    project,
    row_norms,
)


def test_zero_init_is_an_fp32_leaf():
    delta = init_delta((2, 3, 4), device=torch.device("cpu"))
    assert delta.dtype == torch.float32 and delta.is_leaf and delta.requires_grad
    assert (delta == 0).all()


def test_l2_random_init_follows_freelb_scaling():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    g = torch.Generator().manual_seed(0)
    delta = init_delta((2, 4, 5), device=torch.device("cpu"), init_mag=0.5, mask=mask, generator=g)
    assert (delta[1, 2:] == 0).all()
    # each element is U(-1,1)·mag/sqrt(len·H): bounded by that value, row norm ≤ mag
    bounds = torch.tensor([0.5 / math.sqrt(4 * 5), 0.5 / math.sqrt(2 * 5)])
    assert (delta.detach().abs().amax(dim=(1, 2)) <= bounds).all()
    assert (delta.detach().abs().amax(dim=(1, 2)) > bounds / 2).all()
    assert (row_norms(delta) <= 0.5).all()


def test_linf_random_init_is_uniform_in_the_box():
    mask = torch.tensor([[1, 0]])
    delta = init_delta((1, 2, 1000), device=torch.device("cpu"), norm_type="linf", init_mag=0.1, mask=mask)
    assert delta[0, 0].abs().max() <= 0.1 and delta[0, 0].abs().max() > 0.09
    assert (delta[0, 1] == 0).all()


def test_l2_direction_is_unit_per_row():
    g = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])
    d = ascent_direction(g, "l2")
    torch.testing.assert_close(d, torch.tensor([[[0.6, 0.8]], [[0.0, 1.0]]]))


def test_linf_direction_is_g_over_max_abs_not_sign():
    g = torch.tensor([[[1.0, -4.0, 2.0]]])
    torch.testing.assert_close(ascent_direction(g, "linf"), torch.tensor([[[0.25, -1.0, 0.5]]]))


def test_zero_gradient_stays_zero_thanks_to_the_clamp():
    assert (ascent_direction(torch.zeros(2, 3), "l2") == 0).all()


def test_ascent_step_adds_lr_times_direction():
    delta = torch.zeros(2, 1, 2, requires_grad=True)
    grad = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])
    new, skipped = ascent_step(delta, grad, 0.1)
    torch.testing.assert_close(new, torch.tensor([[[0.06, 0.08]], [[0.1, 0.0]]]))
    assert new.is_leaf and new.requires_grad and skipped.item() == 0


def test_l2_projection_rescales_only_rows_above_the_radius():
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = project(delta, 1.0, "l2")
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    assert project(delta, 0.0, "l2") is delta


def test_linf_projection_clamps_elementwise():
    delta = torch.tensor([[0.5, -2.0, 0.1]])
    torch.testing.assert_close(project(delta, 0.3, "linf"), torch.tensor([[0.3, -0.3, 0.1]]))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_keeps_the_delta_and_counts(bad):
    delta = torch.full((2, 3), 0.5, requires_grad=True)
    grad = torch.ones(2, 3)
    grad[1, 2] = bad
    new, skipped = ascent_step(delta, grad, 0.1)
    assert torch.equal(new, delta.detach()) and skipped.item() == 1


def test_missing_gradient_keeps_the_delta():
    delta = torch.ones(1, 2, requires_grad=True)
    new, skipped = ascent_step(delta, None, 0.1)
    assert torch.equal(new, delta.detach()) and skipped.item() == 0


class _Model(nn.Module):
    def perturbation_shapes(self, batch):
        return {"text": (2, 3, 4), "image": (2, 5, 6)}


class _Wrapper(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_shapes_come_from_the_unwrapped_model():
    wrapped = _Wrapper(_Model())
    assert perturbation_shapes(wrapped, {}) == {"text": (2, 3, 4), "image": (2, 5, 6)}
    assert perturbation_shapes(object(), {}, unwrap=lambda m: _Model())["image"] == (2, 5, 6)


def test_masks_come_from_the_model_and_are_checked_against_the_shapes():
    class Masked(_Model):
        mask = torch.tensor([[True, False, True], [True, True, False]])

        def perturbation_masks(self, batch):
            return {"text": self.mask, "image": None}

    shapes = {"text": (2, 3, 4), "image": (2, 5, 6)}
    masks = perturbation_masks(_Wrapper(Masked()), {}, shapes)
    assert masks["text"].tolist() == Masked.mask.tolist() and masks["image"] is None
    Masked.mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"perturbation_masks\(\)\['text'\] must be a \[B, L\] = \(2, 3\)"):
        perturbation_masks(Masked(), {}, shapes)
