"""Pre-training heads: official keys, ties (one tensor), sizes of the official base/large models."""
from __future__ import annotations

import pytest
import torch

from pretrain_testlib import tiny_model
from villa_plugin.backbones.uniter.model import UniterConfig
from villa_plugin.tasks.pretrain.model import UniterForPretraining

HEAD_KEYS = {
    "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.decoder.weight",
    "feat_regress.weight", "feat_regress.bias", "feat_regress.net.0.weight", "feat_regress.net.0.bias",
    "feat_regress.net.2.weight", "feat_regress.net.2.bias",
    "region_classifier.net.0.weight", "region_classifier.net.0.bias", "region_classifier.net.2.weight",
    "region_classifier.net.2.bias", "region_classifier.net.3.weight", "region_classifier.net.3.bias",
    "itm_output.weight", "itm_output.bias",
}


def test_head_keys_are_the_official_ones():
    keys = set(tiny_model().state_dict())
    assert {k for k in keys if not k.startswith("uniter.")} == HEAD_KEYS


def test_ties_are_one_tensor_listed_under_both_names():
    model = tiny_model()
    word = model.uniter.embeddings.word_embeddings.weight
    img_linear = model.uniter.img_embeddings.img_linear.weight
    assert model.cls.predictions.decoder.weight is word and model.feat_regress.weight is img_linear
    state = model.state_dict()
    assert state["cls.predictions.decoder.weight"].data_ptr() == state["uniter.embeddings.word_embeddings.weight"].data_ptr()
    assert state["feat_regress.weight"].data_ptr() == state["uniter.img_embeddings.img_linear.weight"].data_ptr()
    names = [name for name, _ in model.named_parameters()]
    assert "cls.predictions.decoder.weight" not in names and "feat_regress.weight" not in names
    assert "uniter.embeddings.word_embeddings.weight" in names and "uniter.img_embeddings.img_linear.weight" in names
    with torch.no_grad():
        word[5].fill_(7.0)
    assert (model.cls.predictions.decoder.weight[5] == 7.0).all()
    assert model.uniter.embeddings.word_embeddings.padding_idx == 0


def test_init_is_the_references():
    model = tiny_model()
    assert (model.cls.predictions.bias == 0).all() and (model.feat_regress.bias == 0).all()
    assert (model.region_classifier.net[2].weight == 1).all() and (model.itm_output.bias == 0).all()
    assert model.region_classifier.net[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.uniter.embeddings.word_embeddings.weight[0].abs().max() > 0  # init overwrites padding rows


@pytest.mark.parametrize("size, params, keys", [("base", 112_938_887, 230), ("large", 340_524_935, 422)])
def test_official_sizes(size, params, keys):
    config = UniterConfig() if size == "base" else UniterConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    with torch.device("meta"):
        model = UniterForPretraining(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys
    if size == "base":
        heads = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("uniter."))
        assert heads == 3_040_135
