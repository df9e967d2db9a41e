"""VILLA stage-1 choices: the per-task config, its consistency terms, and δ reaching the pre-training model."""
from __future__ import annotations

import pytest
import torch

from pretrain_testlib import itm_rows, mlm_rows, mrm_rows, raw_examples, tiny_model
from villa_plugin.common.errors import ConfigError
from villa_plugin.tasks.pretrain.adversarial import PretrainAdversarialConfig, consistency_loss
from villa_plugin.tasks.pretrain.collate import itm_collate, mlm_collate, mrm_collate


def test_defaults_are_documented_choices():
    config = PretrainAdversarialConfig.from_dict({})
    assert config.engine.adv_training is False  # off unless enabled
    assert (config.engine.adv_steps, config.engine.adv_kl_weight, config.engine.adv_modality) == (3, 1.5, ("text",))
    assert [t for t, s in config.tasks.items() if s.perturb] == ["mlm", "mrckl", "itm"]
    assert config.setting("mrfr").consistency == "none" and config.setting("mrfr").kl_reduction is None
    for task in ("mlm", "mrc", "mrckl", "itm"):
        assert config.setting(task).consistency == "symmetric_kl"
        assert config.setting(task).kl_reduction == "sum_classes_mean"
    assert config.itm_ot_in_adv_steps is True and not config.perturbs("mlm")


def test_overrides():
    config = PretrainAdversarialConfig.from_dict({
        "adv_training": True, "adv_tasks": ["mlm", "mrfr"], "consistency": {"mrfr": "mse"},
        "modality": {"mrfr": ["image"]}, "kl_reduction": {"mlm": "mean"}, "adv_steps": 2,
    })
    assert config.perturbs("mrfr") and not config.perturbs("itm") and config.engine.adv_steps == 2
    assert config.setting("mrfr").modality == ("image",) and config.setting("mlm").modality == ("text",)
    assert config.setting("mlm").kl_reduction == "mean"


@pytest.mark.parametrize("block, match", [
    ({"consistency": {"mrfr": "symmetric_kl"}, "adv_tasks": ["mrfr"]}, "not a distribution"),
    ({"consistency": {"itm": "mse"}}, "class logits"),
    ({"adv_tasks": ["mlmm"]}, 'Did you mean "mlm"'),
    ({"kl_reduction": {"mlm": "batchmean"}}, "kl_reduction.mlm"),
    ({"modality": {"mrfr": ["image"]}}, "not in adv_tasks"),
    ({"consistency": {"mrfr": "mse"}}, "not in adv_tasks"),
    ({"consistency": {"mlm": "none"}, "kl_reduction": {"mlm": "mean"}}, "no effect"),
    ({"adv_stepz": 3}, "adv_steps"),
    ({"itm_ot_in_adv_steps": "yes"}, "itm_ot_in_adv_steps"),
])
def test_bad_settings_are_config_errors(block, match):
    with pytest.raises(ConfigError, match=match):
        PretrainAdversarialConfig.from_dict(block)


def test_consistency_terms():
    config = PretrainAdversarialConfig.from_dict({"adv_tasks": ["mlm", "mrfr"], "consistency": {"mrfr": "mse"}})
    adv, clean = torch.randn(5, 7), torch.randn(5, 7)
    p, q = torch.softmax(clean, -1), torch.softmax(adv, -1)
    expected = ((p * (p.log() - q.log())).sum(-1) + (q * (q.log() - p.log())).sum(-1)).mean()
    torch.testing.assert_close(consistency_loss(config.setting("mlm"), adv, clean), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(consistency_loss(config.setting("mrfr"), adv, clean), ((adv - clean) ** 2).mean())
    assert consistency_loss(config.setting("mrfr"), adv, adv) == 0
    assert consistency_loss(PretrainAdversarialConfig.from_dict({}).setting("mrfr"), adv, clean) is None
    with pytest.raises(ValueError, match="same masked batch"):
        consistency_loss(config.setting("mlm"), adv, clean[:4])


@pytest.mark.parametrize("task", ["mlm", "mrckl", "itm"])
def test_perturbation_reaches_the_model_and_zero_delta_is_clean(task):
    model, examples = tiny_model(), raw_examples()
    batch = {"mlm": lambda: mlm_collate(mlm_rows(examples)), "mrckl": lambda: mrm_collate(mrm_rows(examples), "mrckl"),
             "itm": lambda: itm_collate(itm_rows(examples, (1, 0, 1)))}[task]()
    shapes = model.perturbation_shapes(batch)
    masks = model.perturbation_masks(batch)
    assert masks["text"].sum().item() == sum(batch["txt_lens"]) and masks["image"].sum().item() == sum(batch["num_bbs"])
    clean = model(batch)
    zero = model(batch, perturbation={"text": torch.zeros(shapes["text"]), "image": torch.zeros(shapes["image"])})
    torch.testing.assert_close(zero["scores"], clean["scores"], rtol=0, atol=0)
    text_delta = (0.5 * torch.randn(shapes["text"])).requires_grad_(True)
    adv = model(batch, perturbation={"text": text_delta})
    setting = PretrainAdversarialConfig.from_dict({}).setting(task)
    kl = consistency_loss(setting, adv["scores"], clean["scores"])
    assert kl > 0
    (sum(adv["losses"].values()) + kl).backward()
    assert text_delta.grad is not None and text_delta.grad.abs().sum() > 0
