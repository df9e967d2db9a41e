"""The registered ``uniter_pretrain`` model: official keys and ties, prefixed losses, perturbations,
per-task adversarial settings and itm_ot_in_adv_steps."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from villa_plugin.adversarial import AdversarialConfig
from villa_plugin.adversarial.protocol import check_perturbable
from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import registry
from villa_plugin.tasks.pretrain.collate import itm_collate

from pretrain_testlib import raw_examples

ARCH = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}


def _model(**adversarial):
    torch.manual_seed(0)
    model = registry.get_model_class("uniter_pretrain")(OmegaConf.create(
        {"uniter_config": "base", "dropout": 0.0, "architecture": ARCH, "adversarial": adversarial}))
    model.build()
    model.init_losses()
    return model


def _itm_batch():
    rows = [dict(ex, input_ids=[1] + ex["tokens"] + [2], target=i % 2) for i, ex in enumerate(raw_examples())]
    batch = itm_collate(rows, with_ot=True)
    batch.update(task="itm", dataset_name="coco", dataset_type="val")
    return batch


def test_official_keys_ties_and_prefixed_losses():
    model = _model()
    keys = model.state_dict().keys()
    assert {"cls.predictions.bias", "feat_regress.bias", "region_classifier.net.3.weight", "itm_output.weight"} <= set(keys)
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight
    assert torch.count_nonzero(model.uniter.img_embeddings.mask_embedding.weight[0]) == 0
    output = model(_itm_batch())
    assert set(output["losses"]) == {"val/coco/itm", "val/coco/itm_ot"} and output["scores"].shape == (3, 2)
    assert check_perturbable(model, "uniter_pretrain") == "sum_classes_mean"


def test_itm_ot_in_adv_steps_false_drops_wra_from_perturbed_passes_only():
    batch = _itm_batch()
    shapes = _model().perturbation_shapes(batch)
    delta = {"text": torch.zeros(shapes["text"]), "image": torch.zeros(shapes["image"])}
    assert "val/coco/itm_ot" in _model()(batch, perturbation=delta)["losses"]
    off = _model(itm_ot_in_adv_steps=False)
    assert "val/coco/itm_ot" in off(batch)["losses"]
    assert set(off(batch, perturbation=delta)["losses"]) == {"val/coco/itm"}


def test_task_adversarial_settings_and_consistency_terms():
    model = _model(adv_training=True, adv_tasks=["mlm", "mrfr"], consistency={"mrfr": "mse"}, modality={"mrfr": ["image"]})
    engine = AdversarialConfig(adv_modality=("text",))
    mlm, mlm_term = model.task_adversarial("mlm", engine)
    mrfr, mrfr_term = model.task_adversarial("mrfr", engine)
    itm, _ = model.task_adversarial("itm", engine)
    assert mlm.adv_training and mlm.adv_modality == ("text",) and not itm.adv_training
    assert mrfr.adv_training and mrfr.adv_modality == ("image",)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(mrfr_term(a, b), ((a - b) ** 2).mean())
    assert mlm_term(a, a).abs() < 1e-6 and mlm_term(a, b) > 0
    full = OmegaConf.create({"model": "uniter_pretrain", "model_config": {"uniter_pretrain": {"adversarial": {"adv_tasks": ["nope"]}}}})
    with pytest.raises(ConfigError, match="unknown pre-training task 'nope'"):
        registry.get_model_class("uniter_pretrain").adversarial_config(full)


def _task_batch(task):
    from pretrain_testlib import itm_rows, mlm_rows, mrm_rows
    from villa_plugin.tasks.pretrain.collate import mlm_collate, mrm_collate

    examples = raw_examples()
    if task == "mlm":
        batch = mlm_collate(mlm_rows(examples))
    elif task == "itm":
        batch = itm_collate(itm_rows(examples, [1, 0, 1]), with_ot=True)
    else:
        batch = mrm_collate(mrm_rows(examples), task)
    batch.update(task=task, dataset_name="coco", dataset_type="train")
    return batch


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrckl", "itm"])
def test_official_and_exact_give_the_same_gradients_per_task(task):
    import dataclasses

    from villa_plugin.adversarial import FreeATEngine

    grads = {}
    for formulation in ("official", "exact"):
        model = _model(adv_training=True, adv_tasks=["mlm", "mrfr", "mrckl", "itm"], consistency={"mrfr": "mse"})
        base = AdversarialConfig(adv_modality=("image", "text"), adv_steps=3, adv_lr_txt=0.3, adv_lr_img=0.3,
                                 formulation=formulation)
        config, consistency = model.task_adversarial(task, base)
        batch = _task_batch(task)
        stats = FreeATEngine(dataclasses.replace(config)).step(
            model, batch, backward=lambda loss, retain_graph=False: loss.backward(retain_graph=retain_graph),
            kl_reduction=model.kl_reduction, consistency=consistency)
        assert stats["kl"] > 0, "the perturbation must change the outputs"
        grads[formulation] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["official"].keys() == grads["exact"].keys()
    for name, grad in grads["official"].items():
        torch.testing.assert_close(grads["exact"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
