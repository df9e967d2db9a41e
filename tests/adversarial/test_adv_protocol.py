"""The Perturbable contract: a model that implements it passes; a missing member is named."""
from __future__ import annotations

import pytest

from adv_tiny_model import TinyVLModel, make_model
from villa_plugin.adversarial.protocol import Perturbable, check_perturbable
from villa_plugin.common.errors import ConfigError


def test_a_perturbable_model_passes_and_gives_its_kl_reduction():
    model = make_model(kl_reduction="sum_classes_mean")
    assert isinstance(model, Perturbable)
    assert check_perturbable(model, "tiny") == "sum_classes_mean"


class _NoMasks(TinyVLModel):
    perturbation_masks = None


class _NoShapes(TinyVLModel):
    perturbation_shapes = None


class _PlainForward(TinyVLModel):
    def forward(self, batch):
        return super().forward(batch)


@pytest.mark.parametrize(
    "model_cls, member",
    [(_NoMasks, "perturbation_masks(batch)"), (_NoShapes, "perturbation_shapes(batch)"),
     (_PlainForward, "forward(batch, perturbation=None)")],  # fmt: skip
)
def test_a_missing_member_is_named_with_the_guide(model_cls, member):
    with pytest.raises(ConfigError) as err:
        check_perturbable(model_cls(), "toy")
    message = str(err.value)
    assert f"`{member}`" in message and 'Model "toy"' in message
    assert "docs/adding_a_backbone.md" in message and "model_config.toy.adversarial.adv_training=false" in message


def test_kl_reduction_missing_or_unknown():
    model = TinyVLModel()
    model.kl_reduction = None
    with pytest.raises(ConfigError, match="`kl_reduction`"):
        check_perturbable(model, "toy")
    model.kl_reduction = "sum"
    with pytest.raises(ConfigError, match=r"kl_reduction: Unknown KL reduction 'sum'"):
        check_perturbable(model, "toy")
