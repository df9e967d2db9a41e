"""LXMERT checkpoint key maps: official pre-trained / fine-tuned and HF files round-trip; bad files fail clearly."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lxmert_testlib import make_model
from villa_plugin.backbones.lxmert import LxmertConfig, LxmertModel, build_lxmert_for_task
from villa_plugin.backbones.lxmert.answer_table import convert_ans, pretrain_answer_list
from villa_plugin.backbones.lxmert.keys import (
    canonical_key,
    detect_layout,
    export_state_dict,
    load_lxmert_checkpoint,
)
from villa_plugin.common.errors import CheckpointError


class _Pickled:
    """An arbitrary object: a file holding it cannot be read with weights_only=True."""


def _pretraining_heads(hidden=32, n_answers=6):
    """Fake cls.* / obj_predict_head.* / answer_head.* tensors as the pre-trained file has them."""
    return {
        "cls.predictions.bias": torch.zeros(40),
        "cls.predictions.decoder.weight": torch.zeros(40, hidden),
        "cls.seq_relationship.weight": torch.zeros(2, hidden),
        "obj_predict_head.decoder_dict.obj.weight": torch.zeros(7, hidden),
        "answer_head.logit_fc.0.weight": torch.randn(2 * hidden, hidden),
        "answer_head.logit_fc.0.bias": torch.randn(2 * hidden),
        "answer_head.logit_fc.2.weight": torch.randn(2 * hidden),
        "answer_head.logit_fc.2.bias": torch.randn(2 * hidden),
        "answer_head.logit_fc.3.weight": torch.randn(n_answers, 2 * hidden),
        "answer_head.logit_fc.3.bias": torch.randn(n_answers),
    }


def _assert_same(a, b, prefix=""):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix)]
    assert keys
    for key in keys:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "layout,multi_gpu,fmt",
    [
        ("plugin", False, "pt"),
        ("hf", False, "safetensors"),
        ("hf", False, "pt"),
        ("official_finetuned", False, "pt"),
        ("official_finetuned", True, "pt"),
    ],
)
def test_full_model_round_trips(tmp_path, layout, multi_gpu, fmt):
    source = make_model("vqa", seed=1)
    state = {k: v.clone() for k, v in export_state_dict(source, layout, multi_gpu=multi_gpu).items()}
    path = str(tmp_path / f"model.{fmt}")
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    target = make_model("vqa", seed=2)
    report = load_lxmert_checkpoint(target, path)
    _assert_same(source, target)
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    assert len(report.loaded) == len(target.state_dict())


def test_official_pretrained_file_loads_the_trunk_and_ignores_pretraining_heads(tmp_path):
    source = make_model("vqa", seed=1)
    state = export_state_dict(source, "official_pretrained", multi_gpu=True)
    state.update({"module." + k: v for k, v in _pretraining_heads().items()})
    assert all(k.startswith("module.") for k in state)
    path = str(tmp_path / "model_LXRT.pth")
    torch.save(state, path)
    target = make_model("vqa", seed=2)
    before = {k: v.clone() for k, v in target.logit_fc.state_dict().items()}
    report = load_lxmert_checkpoint(target, path)
    assert report.layout == "official_pretrained"
    _assert_same(source, target, prefix="lxmert.")
    assert all(torch.equal(v, target.logit_fc.state_dict()[k]) for k, v in before.items())  # head untouched
    assert sorted(report.missing) == sorted(f"logit_fc.{k}" for k in before)
    assert len(report.ignored) == 10 and any("answer head ignored" in n for n in report.notes)


def test_pretrained_answer_head_surgery():
    """--loadLXMERTQA: rows copied by normalised answer string, unknown answers zeroed."""
    heads = _pretraining_heads(n_answers=6)
    pretrain = pretrain_answer_list([{"ans": a} for a in ["yes", "no", "2", "man", "gray", "red"]])
    label2ans = ["no", "Two", "the man", "purple", "grey."]
    source = make_model("vqa", seed=1)
    state = export_state_dict(source, "official_pretrained", multi_gpu=True)
    state.update({"module." + k: v for k, v in heads.items()})
    target = build_lxmert_for_task({"architecture": make_model().lxmert_config.to_dict(), "num_labels": 5})
    report = load_lxmert_checkpoint(target, state, label2ans=label2ans, pretrain_answers=pretrain)
    w, b = target.logit_fc[3].weight, target.logit_fc[3].bias
    for label, row in enumerate([1, 2, 3, None, 4]):
        if row is None:
            assert w[label].abs().max() == 0 and b[label] == 0
        else:
            assert torch.equal(w[label], heads["answer_head.logit_fc.3.weight"][row])
            assert torch.equal(b[label], heads["answer_head.logit_fc.3.bias"][row])
    assert torch.equal(target.logit_fc[0].weight, heads["answer_head.logit_fc.0.weight"])
    assert report.missing == [] and any("4 of 5 answers found, 1 zero rows" in n for n in report.notes)


def test_convert_ans():
    assert [convert_ans(a) for a in ["The Man.", "an apple", "Grey", "three", "", "a"]] == [
        "man", "apple", "gray", "3", "", "a"]


def test_hf_keys_load_into_a_bare_trunk():
    source = make_model("vqa", seed=1)
    state = export_state_dict(source, "hf")
    trunk = LxmertModel(LxmertConfig(**source.lxmert_config.to_dict()))
    report = load_lxmert_checkpoint(trunk, state)
    assert sorted(report.unexpected) == sorted(k.replace("answer_head.", "") for k in state if k.startswith("answer_head."))
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, source.lxmert.state_dict()[key]), key


def test_full_size_official_key_names_and_shapes():
    """The 449 official ``bert.*`` keys (lxmert.md §3.1) come out of the full-size model."""
    with torch.device("meta"):
        model = build_lxmert_for_task({"head": "lxmert_vqa", "num_labels": 3129})
    state = export_state_dict(model, "official_pretrained", multi_gpu=True)
    assert len(state) == 449 and all(k.startswith("module.bert.") for k in state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["module.bert.embeddings.word_embeddings.weight"] == (30522, 768)
    assert shapes["module.bert.encoder.visn_fc.visn_fc.weight"] == (768, 2048)
    assert shapes["module.bert.encoder.visn_fc.box_fc.weight"] == (768, 4)
    assert shapes["module.bert.encoder.x_layers.4.visual_attention.att.query.weight"] == (768, 768)
    assert shapes["module.bert.encoder.x_layers.0.lang_self_att.self.key.bias"] == (768,)
    assert shapes["module.bert.encoder.x_layers.3.visn_output.LayerNorm.weight"] == (768,)
    assert shapes["module.bert.encoder.r_layers.4.intermediate.dense.weight"] == (3072, 768)
    assert shapes["module.bert.encoder.layer.8.output.dense.weight"] == (768, 3072)
    assert shapes["module.bert.pooler.dense.weight"] == (768, 768)
    counts = {part: sum(f".{part}." in k for k in state) for part in ("layer", "r_layers", "x_layers")}
    assert counts == {"layer": 144, "r_layers": 80, "x_layers": 210}
    finetuned = export_state_dict(model, "official_finetuned")
    assert sorted(k for k in finetuned if not k.startswith("lxrt_encoder.model.bert.")) == [
        "logit_fc.0.bias", "logit_fc.0.weight", "logit_fc.2.bias", "logit_fc.2.weight", "logit_fc.3.bias",
        "logit_fc.3.weight"]


def test_key_mapping_rules():
    assert canonical_key("module.bert.pooler.dense.weight") == "lxmert.pooler.dense.weight"
    assert canonical_key("lxrt_encoder.model.module.bert.encoder.layer.0.output.dense.bias") == (
        "lxmert.encoder.layer.0.output.dense.bias")
    assert canonical_key("answer_head.logit_fc.3.bias") == "logit_fc.3.bias"
    assert canonical_key("module.cls.predictions.bias") is None
    assert detect_layout(["lxmert.pooler.dense.weight", "answer_head.logit_fc.0.weight"]) == "hf"
    assert detect_layout(["lxmert.pooler.dense.weight", "cls.predictions.bias"]) == "hf_pretrained"


def test_shape_mismatch_names_the_key_and_both_shapes():
    source = make_model("vqa", seed=1)
    state = export_state_dict(source, "official_finetuned", multi_gpu=True)
    state["lxrt_encoder.model.module.bert.encoder.visn_fc.visn_fc.weight"] = torch.zeros(32, 2048)
    with pytest.raises(CheckpointError) as err:
        load_lxmert_checkpoint(make_model("vqa", seed=2), state, source="BEST.pth")
    message = str(err.value)
    assert "'lxmert.encoder.visn_fc.visn_fc.weight'" in message
    assert "'lxrt_encoder.model.module.bert.encoder.visn_fc.visn_fc.weight'" in message
    assert "[32, 2048]" in message and "[32, 12]" in message and "BEST.pth" in message


def test_head_label_mismatch_and_foreign_files_are_errors(tmp_path):
    nlvr2 = make_model("nlvr2", seed=1)
    with pytest.raises(CheckpointError, match=r"logit_fc.0.weight.*\[64, 64\] vs model \[64, 32\]"):
        load_lxmert_checkpoint(make_model("vqa"), export_state_dict(nlvr2, "hf"))
    with pytest.raises(CheckpointError, match="No key"):
        load_lxmert_checkpoint(make_model("vqa"), {"uniter.embeddings.word_embeddings.weight": torch.zeros(3)})
    path = tmp_path / "pickled.pth"
    torch.save({"weights": torch.zeros(2), "config": _Pickled()}, path)
    with pytest.raises(CheckpointError, match="pickled.pth"):
        load_lxmert_checkpoint(make_model("vqa"), str(path))


def test_unexpected_keys_are_reported_by_name():
    source = make_model("vqa", seed=1)
    state = dict(export_state_dict(source, "hf"), **{"lxmert.encoder.extra.weight": torch.zeros(2)})
    report = load_lxmert_checkpoint(make_model("vqa", seed=2), state)
    assert report.unexpected == ["lxmert.encoder.extra.weight"] and report.layout == "hf"
