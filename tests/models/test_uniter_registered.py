"""Registered models ``uniter`` / ``villa``: config, build, forward, losses, perturbations, groups."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from uniter_testlib import TINY_ARCH, make_batch, tiny_model_config
from villa_plugin.adversarial.config import AdversarialConfig
from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.config.compose import build_config
from villa_plugin.backbones.uniter.checkpoint_keys import export_safetensors
from villa_plugin.models.trunk import TrunkDims
from villa_plugin.models.registered import UNITER, VILLA
from villa_plugin.backbones.uniter.model import UniterConfig
from villa_plugin.registry import registry

OPTIMIZER = {
    "params": {"lr": 8e-5, "weight_decay": 0.01},
    "no_decay": ["bias", "LayerNorm.bias", "LayerNorm.weight"],
    "lr_multipliers": {"vqa_output": 10},
}


def build(cls=UNITER, seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_model_config(**overrides))
    model.build()
    model.init_losses()
    return model


def test_registered_names():
    assert registry.get_model_class("uniter") is UNITER
    assert registry.get_model_class("villa") is VILLA
    assert issubclass(VILLA, UNITER)


def test_yaml_defaults_of_uniter_and_villa():
    uniter = OmegaConf.to_container(OmegaConf.load(UNITER.config_path()))["model_config"]["uniter"]
    villa = OmegaConf.to_container(OmegaConf.load(VILLA.config_path()))["model_config"]["villa"]
    assert uniter["adversarial"]["adv_training"] is False and villa["adversarial"]["adv_training"] is True
    uniter["adversarial"]["adv_training"] = True
    assert uniter == villa  # the two models differ only by adv_training
    assert villa["uniter_config"] == "base" and villa["head"] == "vqa" and villa["num_labels"] == 3129
    assert villa["dropout"] == 0.1 and villa["pretrained_checkpoint"] == ""
    assert villa["losses"] == [{"type": "logit_bce"}]
    adv = AdversarialConfig.from_dict(villa["adversarial"])
    assert adv.adv_modality == ("text",) and adv.adv_steps == 3
    assert adv.adv_lr_txt == adv.adv_lr_img == 1e-3 and adv.adv_init_mag == 0.0
    assert adv.norm_type == "l2" and adv.adv_max_norm == 0.0 and adv.adv_kl_weight == 1.5
    assert adv.formulation == "exact" and adv.kl_detach_clean is False


def test_composed_config_builds_a_tiny_villa_model():
    overrides = [f"model_config.villa.architecture.{k}={v}" for k, v in TINY_ARCH.items()]
    config = build_config(["model=villa", "model_config.villa.num_labels=5", *overrides], load_plugins=False)
    model = VILLA(config.model_config.villa)
    model.build()
    model.init_losses()
    assert model.uniter_config.hidden_size == 32 and model.uniter_config.vocab_size == 100
    out = model(make_batch([4, 2], [3, 3], num_labels=5))
    assert out["scores"].shape == (2, 5) and "train/vqa2/logit_bce" in out["losses"]


def test_forward_scores_and_losses_from_call():
    model = build()
    batch = make_batch([5, 3, 4], [2, 4, 3], num_labels=5)
    out = model(batch)
    assert out["scores"].shape == (3, 5)
    loss = out["losses"]["train/vqa2/logit_bce"]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out["scores"], batch.targets) * 5
    torch.testing.assert_close(loss, expected)
    del batch["targets"]
    assert "losses" not in model(batch)


def test_head_reads_the_trunk_pooler():
    model = build().eval()
    batch = make_batch([4, 2], [3, 3])
    seq = model.uniter(batch.input_ids, batch.position_ids, batch.img_feat, batch.img_pos_feat, batch.attn_masks,
                       batch.gather_index, output_all_encoded_layers=False)
    expected = model.vqa_output(torch.tanh(model.uniter.pooler.dense(seq[:, 0])))
    torch.testing.assert_close(model(batch)["scores"], expected)
    assert [type(m).__name__ for m in model.vqa_output] == ["Linear", "GELU", "LayerNorm", "Linear"]
    assert model.vqa_output[0].weight.shape == (64, 32) and model.vqa_output[3].weight.shape == (5, 64)
    assert model.vqa_output[2].eps == 1e-12


def test_vqa_head_size_matches_spec():
    head = registry.get_head_class("vqa")(TrunkDims.of(UniterConfig.from_name("base")), 3129, {})
    assert sum(p.numel() for p in head.parameters()) == 5_993_529


def test_perturbation_contract():
    model = build().eval()
    batch = make_batch([4, 2], [3, 1], num_labels=5)
    assert model.perturbation_shapes(batch) == {"text": (2, 4, 32), "image": (2, 3, 2048)}
    assert model.kl_reduction == "mean_times_classes" and model.head_module_name == "vqa_output"
    clean = model(batch)["scores"]
    zeros = {"text": torch.zeros(2, 4, 32), "image": torch.zeros(2, 3, 2048)}
    torch.testing.assert_close(model(batch, perturbation=zeros)["scores"], clean, atol=0, rtol=0)
    torch.testing.assert_close(model(batch, perturbation={"text": None, "image": None})["scores"], clean)

    delta = torch.zeros(2, 4, 32, requires_grad=True)
    out = model(batch, perturbation={"text": delta})
    out["losses"]["train/vqa2/logit_bce"].backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    moved = model(batch, perturbation={"text": torch.randn(2, 4, 32)})["scores"]
    assert not torch.allclose(moved, clean)

    with pytest.raises(ValueError, match=r"perturbation\['image'\] has shape \(2, 3, 32\)"):
        model(batch, perturbation={"image": torch.zeros(2, 3, 32)})
    with pytest.raises(ValueError, match="keys in"):
        model(batch, perturbation={"txt": torch.zeros(2, 4, 32)})


def test_optimizer_groups_follow_the_reference():
    model = build()
    groups = model.get_optimizer_parameters(OmegaConf.create(OPTIMIZER))
    names = {id(p): n for n, p in model.named_parameters()}
    as_names = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert [g["lr_mult"] for g in groups] == [10.0, 10.0, 1.0, 1.0]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.0]
    assert as_names[0] == ["vqa_output.0.weight", "vqa_output.2.weight", "vqa_output.3.weight"]
    assert as_names[1] == ["vqa_output.0.bias", "vqa_output.2.bias", "vqa_output.3.bias"]
    assert "uniter.img_embeddings.img_layer_norm.weight" in as_names[2]  # decayed: no "LayerNorm" in name
    assert "uniter.embeddings.LayerNorm.weight" in as_names[3]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(n) for n in as_names) == len(trainable)
    assert "uniter.img_embeddings.mask_embedding.weight" not in trainable  # pretraining-only, frozen
    full = model.get_optimizer_parameters(OmegaConf.create({"optimizer": OPTIMIZER}))
    assert [len(g["params"]) for g in full] == [len(g["params"]) for g in groups]


def test_dropout_key_sets_every_trunk_dropout():
    model = build(dropout=0.3)
    ps = {m.p for m in model.uniter.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.3}
    kept = build(dropout=None, architecture=dict(TINY_ARCH, hidden_dropout_prob=0.2))
    assert kept.uniter_config.hidden_dropout_prob == 0.2 and kept.uniter_config.attention_probs_dropout_prob == 0.1
    with pytest.raises(ConfigError, match="dropout"):
        build(dropout=1.5)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match='Unknown head "vqa3".*Did you mean "vqa"'):
        build(head="vqa3")
    with pytest.raises(ConfigError, match="model_config.uniter.uniter_config.*nothere.json"):
        build(uniter_config=str(tmp_path / "nothere.json"))
    with pytest.raises(ConfigError, match="hidden_sise"):
        build(architecture={"hidden_sise": 3})
    with pytest.raises(ConfigError, match="model_config.villa.num_labels"):
        build(VILLA, num_labels=0)


def test_pretrained_checkpoint_is_loaded_in_build(tmp_path):
    source = build(seed=1)
    path = export_safetensors(source, tmp_path / "villa-tiny.safetensors")
    model = build(seed=2, pretrained_checkpoint=path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0)
    assert model.load_report is not None and model.load_report.missing == []
    with pytest.raises(CheckpointError, match="pretrained_checkpoint.*missing-villa-base.pt"):
        build(pretrained_checkpoint=str(tmp_path / "missing-villa-base.pt"))


def test_img_dim_key_sets_the_region_feature_width(tmp_path):
    model = build(img_dim=512).eval()
    assert model.uniter.img_embeddings.img_linear.in_features == 512
    assert model.uniter.img_embeddings.mask_embedding.embedding_dim == 512
    batch = make_batch([4, 2], [3, 1], num_labels=5)
    batch["img_feat"] = batch["img_feat"][..., :512].contiguous()  # 512-d features, no zero-padding
    assert model.perturbation_shapes(batch)["image"] == (2, 3, 512)
    delta = torch.zeros(2, 3, 512, requires_grad=True)
    model(batch, perturbation={"image": delta})["losses"]["train/vqa2/logit_bce"].backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="model_config.uniter.img_dim"):
        build(img_dim="2048")


def test_checkpoint_of_another_feature_width_is_a_shape_error_naming_the_key(tmp_path):
    path = export_safetensors(build(seed=1), tmp_path / "villa-tiny-2048.safetensors")
    with pytest.raises(CheckpointError, match=r"img_embeddings.img_linear.weight.*\[32, 2048\] vs model \[32, 512\].*img_dim"):
        build(img_dim=512, pretrained_checkpoint=path)
