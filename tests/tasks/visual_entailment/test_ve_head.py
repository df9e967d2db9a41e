"""SNLI-VE head: VQA's module with 3 outputs (checkpoint-compatible), BCE x 3 on one-hot targets,
the mean-times-classes KL reduction, no embedding growth."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from uniter_testlib import TINY_ARCH, make_batch, tiny_model_config

from villa_plugin.adversarial.losses import reduce_kl, symmetric_kl
from villa_plugin.common.errors import ConfigError
from villa_plugin.models.registered import UNITER

H = TINY_ARCH["hidden_size"]


def build(**overrides) -> UNITER:
    cfg = tiny_model_config(head="ve", num_labels=3, losses=[{"type": "logit_bce"}])
    cfg.update(overrides)
    model = UNITER(OmegaConf.create(cfg))
    model.build()
    model.init_losses()
    return model


def test_keys_are_vqa_output_with_three_answers():
    model = build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("uniter.")}
    assert shapes == {
        "vqa_output.0.weight": (2 * H, H), "vqa_output.0.bias": (2 * H,),
        "vqa_output.2.weight": (2 * H,), "vqa_output.2.bias": (2 * H,),
        "vqa_output.3.weight": (3, 2 * H), "vqa_output.3.bias": (3,),
    }
    assert isinstance(model.vqa_output[1], nn.GELU)
    assert model.uniter.embeddings.token_type_embeddings.num_embeddings == 2  # no growth


def test_loss_is_bce_times_three_on_one_hot_targets_and_kl_mean_times_classes():
    model = build()
    batch = make_batch([5, 7], [3, 4])
    batch["targets"] = F.one_hot(torch.tensor([1, 2]), 3).float()
    out = model(batch)
    expected = F.binary_cross_entropy_with_logits(out["scores"], batch["targets"]) * 3
    assert torch.allclose(out["losses"]["train/vqa2/logit_bce"], expected)
    kl = symmetric_kl(torch.randn(4, 3), torch.randn(4, 3))
    assert model.kl_reduction == "mean_times_classes"
    assert torch.allclose(reduce_kl(kl, model.kl_reduction), kl.mean() * 3)


def test_wrong_num_labels_is_a_config_error():
    with pytest.raises(ConfigError, match="num_labels: 3"):
        build(num_labels=3129)
