"""AdversarialConfig: parsing and validation of model_config.<model>.adversarial."""
from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from villa_plugin.adversarial.config import AdversarialConfig
from villa_plugin.common.errors import ConfigError


def full_config(block, model="villa"):
    return OmegaConf.create({"model": model, "model_config": {model: {"adversarial": block}}})


@pytest.mark.parametrize(
    "value,canonical",
    [
        (["text"], ("text",)),
        (["image"], ("image",)),
        (["image", "text"], ("image", "text")),
        (["text", "image"], ("image", "text")),
        (["text", "image", "alter"], ("text", "image", "alter")),
        (["alter", "image", "text"], ("text", "image", "alter")),
    ],
)
def test_allowed_modalities_in_any_order(value, canonical):
    config = AdversarialConfig.from_model_config(full_config({"adv_modality": value}))
    assert config.adv_modality == canonical
    assert config.perturb_text == ("text" in value)
    assert config.perturb_image == ("image" in value)
    assert config.alter == ("alter" in value)


@pytest.mark.parametrize("value", ["text", "[text]", ["txt"], ["image", "alter"], [], ["text", "text"], 3])
def test_bad_modality_names_the_key_and_the_choices(value):
    with pytest.raises(ConfigError) as err:
        AdversarialConfig.from_model_config(full_config({"adv_modality": value}, model="uniter"))
    message = str(err.value)
    assert "model_config.uniter.adversarial.adv_modality" in message
    assert "[text] | [image] | [image, text] | [text, image, alter]" in message


@pytest.mark.parametrize(
    "key,value",
    [
        ("adv_steps", 0),
        ("adv_steps", 2.5),
        ("adv_steps", True),
        ("norm_type", "l1"),
        ("formulation", "fast"),
        ("adv_lr_txt", -1.0),
        ("adv_kl_weight", "lots"),
        ("adv_max_norm", float("nan")),
        ("adv_training", "yes"),
        ("kl_detach_clean", 1),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"model_config.villa.adversarial.{key}"):
        AdversarialConfig.from_model_config(full_config({key: value}))


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match='Did you mean "adv_steps"'):
        AdversarialConfig.from_model_config(full_config({"adv_step": 3}))


def test_defaults_and_yaml_values():
    yaml = """
    model: villa
    model_config:
      villa:
        adversarial:
          adv_training: true
          adv_modality: [image, text]
          adv_steps: 5
          adv_lr_txt: 2e-3
          adv_lr_img: 0.01
          norm_type: linf
          formulation: official
    """
    config = AdversarialConfig.from_model_config(OmegaConf.create(yaml))
    assert (config.adv_steps, config.adv_lr_txt, config.adv_lr_img) == (5, 2e-3, 0.01)
    assert (config.norm_type, config.formulation) == ("linf", "official")
    assert config.lr_for("text") == 2e-3 and config.lr_for("image") == 0.01
    assert (config.adv_kl_weight, config.adv_max_norm, config.kl_detach_clean) == (1.5, 0.0, False)


def test_model_without_block_trains_plainly():
    config = AdversarialConfig.from_model_config(OmegaConf.create({"model": "uniter", "model_config": {"uniter": {}}}))
    assert config.adv_training is False


@pytest.mark.parametrize(
    "settings, expected",
    [({"adv_steps": 1}, "adv_steps=1: the single ascent step is the last one, so δ is never updated"),
     ({"adv_lr_img": 0.0, "adv_modality": ["image", "text"]}, "adv_lr_img=0: δ_image is never updated")],  # fmt: skip
)
def test_settings_that_never_update_delta_are_logged(caplog, settings, expected):
    from villa_plugin.adversarial import FreeATEngine

    config = AdversarialConfig.from_dict(settings, key_prefix="model_config.villa.adversarial")
    with caplog.at_level(logging.WARNING, logger="villa_plugin.adversarial.engine"):
        FreeATEngine(config)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("model_config.villa.adversarial: ") and expected in message
    assert "δ stays at 0, so the run adds no perturbation" in message


def test_default_settings_log_nothing(caplog):
    from villa_plugin.adversarial import FreeATEngine

    with caplog.at_level(logging.WARNING, logger="villa_plugin.adversarial.engine"):
        FreeATEngine(AdversarialConfig())
        FreeATEngine(AdversarialConfig(adv_training=False, adv_steps=1))
    assert caplog.records == []
