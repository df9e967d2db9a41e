"""UNITER trunk: official key names and shapes, parameter counts, packing, masks, perturbation entry."""
from __future__ import annotations

import json

import pytest
import torch

from uniter_testlib import make_batch, tiny_config
from villa_plugin.common.errors import ConfigError
from villa_plugin.config.paths import bundled_path
from villa_plugin.datasets.collate import build_gather_index
from villa_plugin.backbones.uniter.model import (
    UniterConfig,
    UniterModel,
    count_parameters,
    grow_type_embeddings,
    grow_word_embeddings,
)


def official_base_trunk_shapes():
    """uniter-architecture.md §4, base, trunk prefix ``uniter.`` (written out from the spec)."""
    H, I, V = 768, 3072, 28996
    shapes = {
        "embeddings.word_embeddings.weight": (V, H),
        "embeddings.position_embeddings.weight": (512, H),
        "embeddings.token_type_embeddings.weight": (2, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
        "img_embeddings.img_linear.weight": (H, 2048),
        "img_embeddings.img_linear.bias": (H,),
        "img_embeddings.img_layer_norm.weight": (H,),
        "img_embeddings.img_layer_norm.bias": (H,),
        "img_embeddings.pos_layer_norm.weight": (H,),
        "img_embeddings.pos_layer_norm.bias": (H,),
        "img_embeddings.pos_linear.weight": (H, 7),
        "img_embeddings.pos_linear.bias": (H,),
        "img_embeddings.mask_embedding.weight": (2, 2048),
        "img_embeddings.LayerNorm.weight": (H,),
        "img_embeddings.LayerNorm.bias": (H,),
        "pooler.dense.weight": (H, H),
        "pooler.dense.bias": (H,),
    }
    for i in range(12):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (H, H)
            shapes[p + f"attention.self.{name}.bias"] = (H,)
        shapes[p + "attention.output.dense.weight"] = (H, H)
        shapes[p + "attention.output.dense.bias"] = (H,)
        shapes[p + "attention.output.LayerNorm.weight"] = (H,)
        shapes[p + "attention.output.LayerNorm.bias"] = (H,)
        shapes[p + "intermediate.dense.weight"] = (I, H)
        shapes[p + "intermediate.dense.bias"] = (I,)
        shapes[p + "output.dense.weight"] = (H, I)
        shapes[p + "output.dense.bias"] = (H,)
        shapes[p + "output.LayerNorm.weight"] = (H,)
        shapes[p + "output.LayerNorm.bias"] = (H,)
    return shapes


@pytest.fixture(scope="module")
def base_trunk():
    torch.manual_seed(0)
    return UniterModel(UniterConfig.from_name("base"))


# -- keys, counts, init -----------------------------------------------------------------------
def test_base_key_set_and_shapes_match_official_checkpoint(base_trunk):
    expected = official_base_trunk_shapes()
    actual = {k: tuple(v.shape) for k, v in base_trunk.state_dict().items()}
    assert set(actual) == set(expected)
    assert actual == expected


def test_trunk_parameter_counts_match_spec(base_trunk):
    assert count_parameters(base_trunk) == 109_898_752
    with torch.device("meta"):
        large = UniterModel(UniterConfig.from_name("large"))
    assert count_parameters(large) == 335_695_872
    assert large.config.num_hidden_layers == 24 and len(large.encoder.layer) == 24


def test_init_follows_reference(base_trunk):
    w = base_trunk.encoder.layer[3].attention.self.query.weight.detach()
    assert abs(float(w.std()) - 0.02) < 1e-3 and abs(float(w.mean())) < 1e-3
    assert torch.count_nonzero(base_trunk.encoder.layer[3].attention.self.query.bias) == 0
    assert torch.count_nonzero(base_trunk.img_embeddings.img_linear.bias) == 0
    ln = base_trunk.embeddings.LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    emb = base_trunk.embeddings.word_embeddings.weight.detach()
    assert abs(float(emb.std()) - 0.02) < 1e-3
    assert base_trunk.embeddings.word_embeddings.padding_idx == 0
    assert base_trunk.embeddings.LayerNorm.eps == 1e-12
    assert base_trunk.img_embeddings.mask_embedding.padding_idx == 0


# -- config -----------------------------------------------------------------------------------
def test_bundled_jsons_hold_the_official_table():
    for name, (hidden, layers, heads, inter) in {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}.items():
        with open(bundled_path(f"configs/models/uniter_configs/uniter-{name}.json")) as handle:
            raw = json.load(handle)
        assert (raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"], raw["intermediate_size"]) == (
            hidden, layers, heads, inter)
        assert raw["vocab_size"] == 28996 and raw["type_vocab_size"] == 2 and raw["max_position_embeddings"] == 512
        assert raw["hidden_dropout_prob"] == raw["attention_probs_dropout_prob"] == 0.1
        assert raw["hidden_act"] == "gelu" and raw["initializer_range"] == 0.02


def test_config_overrides_and_errors(tmp_path):
    cfg = UniterConfig.from_name("base", {"hidden_size": 64, "num_attention_heads": 2, "vocab_size": None})
    assert cfg.hidden_size == 64 and cfg.num_attention_heads == 2 and cfg.vocab_size == 28996
    with pytest.raises(ConfigError, match="hiden_size"):
        UniterConfig.from_name("base", {"hiden_size": 64})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4, "color": "red"}))
    with pytest.raises(ConfigError, match=r"bad\.json.*color"):
        UniterConfig.from_json_file(str(bad))
    with pytest.raises(ConfigError, match="missing.json"):
        UniterConfig.from_name(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="multiple of num_attention_heads"):
        UniterConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="gelu"):
        UniterConfig(hidden_act="relu")
    good = tmp_path / "tiny.json"
    good.write_text(json.dumps({"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}))
    assert UniterConfig.from_name(str(good)).hidden_size == 16


# -- forward: packing, mask, modalities ------------------------------------------------------
def _run(model, batch, **kwargs):
    return model(
        batch.input_ids, batch.position_ids, batch.img_feat, batch.img_pos_feat, batch.attn_masks,
        batch.get("gather_index"), output_all_encoded_layers=False, **kwargs,
    )


def test_hand_built_gather_index_and_packed_sequence():
    # Row 0: 3 text + 2 regions; row 1: 1 text + 1 region (then garbage, masked).
    gather_index, attn_masks = build_gather_index([3, 1], [2, 1], 3, 2)
    assert gather_index.tolist() == [[0, 1, 2, 3, 4], [0, 3, 2, 3, 4]]
    assert attn_masks.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]

    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    batch = make_batch([3, 1], [2, 1])
    captured = {}
    model.encoder.register_forward_pre_hook(lambda mod, args: captured.update(x=args[0]))
    _run(model, batch)
    txt = model._compute_txt_embeddings(batch.input_ids, batch.position_ids)
    img = model._compute_img_embeddings(batch.img_feat, batch.img_pos_feat)
    expected_row0 = torch.cat([txt[0, :3], img[0, :2]])
    expected_row1 = torch.cat([txt[1, :1], img[1, :1]])
    torch.testing.assert_close(captured["x"][0], expected_row0)
    torch.testing.assert_close(captured["x"][1, :2], expected_row1)


def test_gather_packing_equals_padded_concatenation():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    txt_lens, num_bbs = [5, 2, 4], [3, 4, 1]
    batch = make_batch(txt_lens, num_bbs)
    packed = _run(model, batch)
    max_tl = batch.input_ids.size(1)
    txt_mask = (batch.input_ids != 0).long()
    img_mask = torch.zeros(len(num_bbs), batch.img_feat.size(1), dtype=torch.long)
    for i, n in enumerate(num_bbs):
        img_mask[i, :n] = 1
    padded_batch = dict(batch, gather_index=None, attn_masks=torch.cat([txt_mask, img_mask], 1))
    padded = _run(model, type(batch)(padded_batch))
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        torch.testing.assert_close(packed[i, :tl], padded[i, :tl], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[i, tl:tl + nbb], padded[i, max_tl:max_tl + nbb], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.pooler(packed), model.pooler(padded), atol=1e-5, rtol=1e-5)


def test_masked_positions_do_not_change_valid_outputs():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    batch = make_batch([4, 2], [3, 1])
    ref = _run(model, batch)
    noisy = type(batch)(dict(batch))
    noisy["img_feat"] = batch.img_feat.clone()
    noisy["img_feat"][1, 1:] = 100.0  # padded regions of row 1
    noisy["input_ids"] = batch.input_ids.clone()
    noisy["input_ids"][1, 2:] = 7  # padded text of row 1
    out = _run(model, noisy)
    torch.testing.assert_close(out[1, :3], ref[1, :3])
    torch.testing.assert_close(out[0], ref[0])


def test_sdpa_and_eager_attention_agree():
    torch.manual_seed(0)
    sdpa = UniterModel(tiny_config(attn_implementation="sdpa")).eval()
    eager = UniterModel(tiny_config(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    batch = make_batch([4, 2], [3, 1])
    torch.testing.assert_close(_run(sdpa, batch), _run(eager, batch), atol=1e-5, rtol=1e-5)


def test_all_layers_text_only_and_image_only():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    batch = make_batch([4, 3], [2, 2])
    layers = model(batch.input_ids, batch.position_ids, batch.img_feat, batch.img_pos_feat, batch.attn_masks,
                   batch.gather_index)
    assert isinstance(layers, list) and len(layers) == 2
    torch.testing.assert_close(layers[-1], _run(model, batch))
    txt_only = model(batch.input_ids, batch.position_ids, None, None, (batch.input_ids != 0).long(),
                     output_all_encoded_layers=False)
    assert txt_only.shape == (2, 4, 32)
    img_only = model(None, None, batch.img_feat, batch.img_pos_feat, torch.ones(2, 2, dtype=torch.long),
                     output_all_encoded_layers=False)
    assert img_only.shape == (2, 2, 32)
    uneven = make_batch([4, 2], [1, 3])  # packed length 5, padded concatenation 7
    with pytest.raises(ValueError, match="attention_mask has length 5"):
        model(uneven.input_ids, uneven.position_ids, uneven.img_feat, uneven.img_pos_feat, uneven.attn_masks)


def test_image_type_ids_default_to_one_in_shared_table():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    batch = make_batch([3, 3], [2, 2])
    default = _run(model, batch)
    ones = _run(model, batch, img_type_ids=torch.ones(2, 2, dtype=torch.long))
    zeros = _run(model, batch, img_type_ids=torch.zeros(2, 2, dtype=torch.long))
    torch.testing.assert_close(default, ones)
    assert not torch.allclose(default, zeros)


def test_img_masks_use_zeroed_row_zero():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    batch = make_batch([3, 3], [2, 2])
    plain = _run(model, batch)
    unmasked = _run(model, batch, img_masks=torch.zeros(2, 2, dtype=torch.long))
    assert torch.count_nonzero(model.img_embeddings.mask_embedding.weight[0]) == 0
    torch.testing.assert_close(unmasked, plain)
    masked = _run(model, batch, img_masks=torch.tensor([[1, 0], [0, 0]]))
    assert not torch.allclose(masked[0], plain[0])


def test_dropout_active_in_train_mode_only():
    torch.manual_seed(0)
    model = UniterModel(tiny_config())
    batch = make_batch([3, 3], [2, 2])
    model.train()
    assert not torch.allclose(_run(model, batch), _run(model, batch))
    model.eval()
    torch.testing.assert_close(_run(model, batch), _run(model, batch))


def test_runs_in_bf16_parameters():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval().to(torch.bfloat16)
    batch = make_batch([3, 2], [2, 2])
    out = _run(model, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# -- where the perturbations enter -------------------------------------------------------------
def test_text_delta_enters_before_layernorm():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    batch = make_batch([4, 3], [2, 3])
    with torch.no_grad():
        cancel = -model.embeddings.word_embeddings(batch.input_ids)
        perturbed = _run(model, batch, txt_delta=cancel)
        model.embeddings.word_embeddings.weight.zero_()
        zero_words = _run(model, batch)
    torch.testing.assert_close(perturbed, zero_words, atol=1e-5, rtol=1e-5)


def test_image_delta_enters_before_img_linear():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    batch = make_batch([4, 3], [2, 3])
    perturbed = _run(model, batch, img_delta=-batch.img_feat)
    zero_feat = type(batch)(dict(batch, img_feat=torch.zeros_like(batch.img_feat)))
    torch.testing.assert_close(perturbed, _run(model, zero_feat), atol=1e-5, rtol=1e-5)


def test_zero_delta_equals_no_delta_and_gradients_reach_deltas():
    torch.manual_seed(0)
    model = UniterModel(tiny_config()).eval()
    batch = make_batch([4, 3], [2, 3])
    txt_delta = torch.zeros(2, 4, 32, requires_grad=True)
    img_delta = torch.zeros(2, 3, 2048, requires_grad=True)
    out = _run(model, batch, txt_delta=txt_delta, img_delta=img_delta)
    torch.testing.assert_close(out, _run(model, batch), atol=0, rtol=0)
    out.pow(2).sum().backward()
    assert txt_delta.grad.abs().sum() > 0 and img_delta.grad.abs().sum() > 0
    # padded regions of row 0 (index 2 is beyond its 2 regions) are never gathered: zero gradient
    assert img_delta.grad[0, 2].abs().sum() == 0


# -- embedding growth ----------------------------------------------------------------------
def test_grow_type_embeddings_for_nlvr2_and_vcr():
    torch.manual_seed(0)
    model = UniterModel(tiny_config())
    old = model.embeddings.token_type_embeddings.weight.detach().clone()
    grow_type_embeddings(model, 3, {2: 1})
    new = model.embeddings.token_type_embeddings.weight
    assert new.shape == (3, 32) and model.config.type_vocab_size == 3
    torch.testing.assert_close(new[:2], old)
    torch.testing.assert_close(new[2], old[1])

    vcr = UniterModel(tiny_config())
    old = vcr.embeddings.token_type_embeddings.weight.detach().clone()
    grow_type_embeddings(vcr, 4, {2: 0, 3: 0})
    new = vcr.embeddings.token_type_embeddings.weight
    torch.testing.assert_close(new[2], old[0])
    torch.testing.assert_close(new[3], old[0])
    batch = make_batch([3, 2], [2, 2])
    out = _run(vcr, batch, txt_type_ids=torch.full_like(batch.input_ids, 3))
    assert out.shape == (2, 5, 32)
    with pytest.raises(ValueError, match="copy_from"):
        grow_type_embeddings(vcr, 5, {4: 9})
    with pytest.raises(ValueError, match="cannot grow"):
        grow_type_embeddings(vcr, 2, {})


def test_grow_word_embeddings_for_vcr_tags():
    torch.manual_seed(0)
    model = UniterModel(tiny_config())
    old = model.embeddings.word_embeddings.weight.detach().clone()
    grow_word_embeddings(model, 81)
    emb = model.embeddings.word_embeddings
    assert emb.weight.shape == (181, 32) and model.config.vocab_size == 181 and emb.padding_idx == 0
    torch.testing.assert_close(emb.weight[:100], old)
    assert abs(float(emb.weight[100:].detach().std()) - 0.02) < 0.005
    assert isinstance(emb.weight, torch.nn.Parameter) and emb.weight.requires_grad
