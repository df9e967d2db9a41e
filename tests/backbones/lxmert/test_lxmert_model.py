"""The LXMERT trunk + heads against the independent reference forward, sizes, masks and fp32 δ."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lxmert_reference import TINY, official_params, reference_logits
from lxmert_testlib import N_BOX, make_batch, make_model, relative_error, rows_per_example
from villa_plugin.backbones.lxmert import LxmertConfig, LxmertModel, build_lxmert_for_task
from villa_plugin.backbones.lxmert.task_model import LxmertForTask
from villa_plugin.common.errors import ConfigError


def _reference(model, batch, head, **deltas):
    P = official_params(model)
    return reference_logits(
        P, TINY, batch["input_ids"], batch["input_ids"] != 0, batch["img_feat"], batch["img_pos_feat"],
        rows_per_example=rows_per_example(head), visual_mask=LxmertForTask.visual_mask(batch), **deltas,
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("head", ["vqa", "nlvr2"])
@pytest.mark.parametrize("modality", ["none", "text", "image", "both"])
def test_logits_equal_the_reference(head, attn, modality):
    model = make_model(head, attn=attn)
    batch = make_batch(head)
    shapes = model.perturbation_shapes(batch)
    g = torch.Generator().manual_seed(5)
    deltas = {}
    if modality in ("text", "both"):
        deltas["txt_delta"] = torch.randn(shapes["text"], generator=g) * 0.1
    if modality in ("image", "both"):
        deltas["img_delta"] = torch.randn(shapes["image"], generator=g) * 0.1
    perturbation = {"text": deltas.get("txt_delta"), "image": deltas.get("img_delta")}
    ours = model(batch, perturbation=perturbation)["scores"]
    expected = _reference(model, batch, head, **deltas)
    assert ours.shape == expected.shape == (batch["input_ids"].size(0) // rows_per_example(head), 2 if head == "nlvr2" else 5)
    assert relative_error(ours.detach(), expected.detach()) <= 1e-5
    if modality != "none":  # the perturbation changes the logits
        assert relative_error(ours.detach(), model(batch)["scores"].detach()) > 1e-4


def test_visual_mask_from_num_bbs_equals_the_reference():
    model = make_model("vqa")
    batch = make_batch("vqa", num_bbs=[N_BOX, 2, 3])
    mask = LxmertForTask.visual_mask(batch)
    assert mask.tolist()[1] == [True, True, False, False]
    ours = model(batch)["scores"]
    assert relative_error(ours.detach(), _reference(model, batch, "vqa").detach()) <= 1e-5
    full = make_batch("vqa", num_bbs=[N_BOX] * 3)
    assert LxmertForTask.visual_mask(full) is None  # no padding: no mask, as the reference fine-tunes


def test_uniter_box_layout_uses_its_first_four_columns():
    model = make_model("vqa")
    batch = make_batch("vqa")
    boxes = batch["img_pos_feat"]
    wh = boxes[..., 2:4] - boxes[..., 0:2]
    seven = dict(batch, img_pos_feat=torch.cat([boxes, wh, wh[..., :1] * wh[..., 1:]], dim=-1))
    assert torch.equal(model(batch)["scores"], model(seven)["scores"])
    with pytest.raises(ValueError, match="4 columns"):
        model(dict(batch, img_pos_feat=boxes[..., :3]))


def test_full_size_counts_match_the_reference():
    with torch.device("meta"):
        trunk = LxmertModel(LxmertConfig())
        task = build_lxmert_for_task({"head": "lxmert_vqa", "num_labels": 3129})
    assert len(trunk.state_dict()) == 449
    assert sum(p.numel() for p in trunk.parameters()) == 207_936_768
    assert sum(p.numel() for p in task.logit_fc.parameters()) == 5_993_529
    frozen = [n for n, p in trunk.named_parameters() if not p.requires_grad]
    assert len(frozen) == 16 and sum(trunk.get_parameter(n).numel() for n in frozen) == 7_087_872
    assert all(n.startswith("encoder.x_layers.4.visn_") for n in frozen)


def test_perturbation_contract():
    model = make_model("nlvr2")
    batch = make_batch("nlvr2")
    assert model.perturbation_shapes(batch) == {"text": (4, 6, 32), "image": (4, N_BOX, TINY["visual_feat_dim"])}
    masks = model.perturbation_masks(batch)
    assert masks["text"].tolist()[1] == [True] * 4 + [False] * 2 and masks["image"] is None
    assert model.kl_reduction == "mean" and make_model("vqa").kl_reduction == "mean_times_classes"
    with pytest.raises(ValueError, match="shape"):
        model(batch, perturbation={"text": torch.zeros(4, 6, 31)})
    with pytest.raises(ValueError, match="keys"):
        model(batch, perturbation={"txt": torch.zeros(4, 6, 32)})


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_labels: 2"):
        build_lxmert_for_task({"architecture": TINY, "head": "lxmert_nlvr2", "num_labels": 3})
    with pytest.raises(ConfigError, match=r"not an LXMERT head.*lxmert_gqa.*lxmert_nlvr2.*lxmert_vqa"):
        build_lxmert_for_task({"architecture": TINY, "head": "vcr"})  # UNITER's
    with pytest.raises(ConfigError, match="model_config.<model>.head.*no_such_head"):
        build_lxmert_for_task({"architecture": TINY, "head": "no_such_head"})
    with pytest.raises(ConfigError, match="unknown LXMERT config key"):
        build_lxmert_for_task({"architecture": dict(TINY, num_layers=3)})
    with pytest.raises(ConfigError, match="multiple"):
        LxmertConfig(hidden_size=30, num_attention_heads=4)


def test_text_delta_is_added_in_fp32_in_a_bf16_model():
    """A δ far below bf16 resolution still reaches the LayerNorm: the sum runs in fp32."""
    torch.manual_seed(0)
    model = LxmertModel(LxmertConfig(**TINY)).to(torch.bfloat16).eval()
    emb = model.embeddings
    ids = torch.tensor([[1, 5, 7, 9]])
    delta = torch.full((1, 4, 32), 1e-5)
    ours = emb(ids, delta=delta)
    summed = (emb.word_embeddings.weight[ids].float() + delta + emb.position_embeddings.weight[:4].float()
              + emb.token_type_embeddings.weight[0].float())
    ln = emb.LayerNorm
    expected = F.layer_norm(summed, (32,), ln.weight.float(), ln.bias.float(), ln.eps).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, expected)
    naive = emb.word_embeddings.weight[ids] + delta.to(torch.bfloat16)  # what a bf16 add would keep
    lost = (naive == emb.word_embeddings.weight[ids]).float().mean()
    assert lost > 0.5  # ... mostly nothing: δ rounded away


def test_image_delta_reaches_visn_fc_in_fp32_in_a_bf16_model():
    torch.manual_seed(0)
    model = LxmertModel(LxmertConfig(**TINY)).to(torch.bfloat16).eval()
    enc = model.encoder.visn_fc
    feats = torch.rand(1, N_BOX, TINY["visual_feat_dim"]) * 3
    boxes = torch.rand(1, N_BOX, 4)
    delta = torch.randn(1, N_BOX, TINY["visual_feat_dim"]) * 1e-3
    x = F.linear(feats + delta, enc.visn_fc.weight.float(), enc.visn_fc.bias.float())
    x = F.layer_norm(x, (32,), enc.visn_layer_norm.weight.float(), enc.visn_layer_norm.bias.float(), 1e-12)
    y = enc.box_layer_norm(enc.box_fc(boxes.to(torch.bfloat16)))
    assert torch.equal(enc(feats, boxes, delta=delta), (x.to(torch.bfloat16) + y) / 2)
