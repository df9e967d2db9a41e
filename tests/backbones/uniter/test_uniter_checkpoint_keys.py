"""Loading official / MMF / exported weights: every key variant, reports by name, loud failures."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from uniter_testlib import tiny_config, tiny_model_config
from villa_plugin.common.errors import CheckpointError
from villa_plugin.backbones.uniter.checkpoint_keys import (
    export_safetensors,
    load_safetensors,
    load_uniter_checkpoint,
    normalize_state_dict,
)
from villa_plugin.models.registered import UNITER
from villa_plugin.backbones.uniter.model import UniterModel, grow_type_embeddings


def build_model(seed: int, **overrides) -> UNITER:
    torch.manual_seed(seed)
    model = UNITER(tiny_model_config(**overrides))
    model.build()
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, keys=None):
    sa, sb = a.state_dict(), b.state_dict()
    for key in keys or sa:
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=key)


@pytest.fixture
def source():
    return build_model(seed=1)


@pytest.fixture
def target():
    return build_model(seed=2)


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


# -- official layout variants --------------------------------------------------------------------
def test_official_names_round_trip(tmp_path, source, target):
    path = _save(tmp_path, "villa-tiny.pt", source.state_dict())
    report = load_uniter_checkpoint(target, path)
    assert_same_weights(source, target)
    assert report.layout == "official" and report.missing == [] and report.unexpected == []
    assert report.loaded == sorted(source.state_dict()) and report.source == path


def test_bert_prefix_wrapper_module_and_gamma_beta(tmp_path, source, target):
    state = {}
    for key, value in source.state_dict().items():
        key = key.replace("uniter.", "bert.", 1)
        if "LayerNorm" in key or "layer_norm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        state["module." + key] = value
    path = _save(tmp_path, "old-style.pt", {"model_state": state})
    report = load_uniter_checkpoint(target, path)
    assert_same_weights(source, target)
    assert report.missing == [] and report.unexpected == []
    assert report.renamed["module.bert.embeddings.LayerNorm.gamma"] == "uniter.embeddings.LayerNorm.weight"
    assert any("'bert' -> 'uniter'" in note for note in report.notes)


def test_bare_trunk_state_loads_into_task_model_and_back(source, target):
    trunk_only = source.uniter.state_dict()  # keys without "uniter."
    report = load_uniter_checkpoint(target, trunk_only)
    assert_same_weights(source.uniter, target.uniter)
    assert sorted(report.missing) == sorted(k for k in target.state_dict() if k.startswith("vqa_output."))
    bare = UniterModel(tiny_config())
    report = load_uniter_checkpoint(bare, source.state_dict())  # "uniter.*" into a bare trunk
    assert_same_weights(source.uniter, bare)
    assert sorted(report.unexpected) == sorted(k for k in source.state_dict() if k.startswith("vqa_output."))


def test_fp16_checkpoint_is_cast_to_parameter_dtype(tmp_path, source, target):
    half = {k: v.half() for k, v in source.state_dict().items()}
    path = _save(tmp_path, "finetuned-fp16.pt", {"model_state": half})
    report = load_uniter_checkpoint(target, path)
    for key, value in target.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, half[key].float(), atol=0, rtol=0)
    assert sorted(report.cast) == sorted(half)


def test_pretraining_heads_unexpected_and_task_head_missing_are_reported_by_name(tmp_path, source, target, caplog):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("vqa_output.")}
    state["cls.predictions.bias"] = torch.zeros(100)
    state["itm_output.weight"] = torch.zeros(2, 32)
    path = _save(tmp_path, "uniter-tiny.pt", state)
    with caplog.at_level(logging.INFO, logger="villa_plugin.backbones.uniter.checkpoint_keys"):
        report = load_uniter_checkpoint(target, path)
    assert sorted(report.unexpected) == ["cls.predictions.bias", "itm_output.weight"]
    assert report.missing == ["vqa_output.0.weight", "vqa_output.0.bias", "vqa_output.2.weight",
                              "vqa_output.2.bias", "vqa_output.3.weight", "vqa_output.3.bias"]
    assert "vqa_output.3.weight" in caplog.text and "cls.predictions.bias" in caplog.text
    assert_same_weights(source, target, [k for k in state if k.startswith("uniter.")])


# -- errors ---------------------------------------------------------------------------------
def test_shape_mismatch_names_file_key_and_both_shapes(tmp_path, target):
    wide = build_model(seed=3, num_labels=7)
    path = _save(tmp_path, "seven-answers.pt", wide.state_dict())
    with pytest.raises(CheckpointError) as err:
        load_uniter_checkpoint(target, path)
    message = str(err.value)
    assert "seven-answers.pt" in message and "'vqa_output.3.weight'" in message
    assert "[7, 64]" in message and "[5, 64]" in message


def test_missing_unreadable_unsafe_and_foreign_files_fail_loudly(tmp_path, target):
    with pytest.raises(CheckpointError, match="nowhere.pt"):
        load_uniter_checkpoint(target, str(tmp_path / "nowhere.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_uniter_checkpoint(target, str(garbage))
    unsafe = _save(tmp_path, "mmf.ckpt", {"model": target.state_dict(), "config": PickledConfig()})
    with pytest.raises(CheckpointError, match="weights_only"):
        load_uniter_checkpoint(target, unsafe)
    foreign = _save(tmp_path, "resnet.pt", {"conv1.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="No key of checkpoint .*resnet.pt"):
        load_uniter_checkpoint(target, foreign)
    no_tensors = _save(tmp_path, "counters.pt", {"num_updates": 3})
    with pytest.raises(CheckpointError, match="no state dict"):
        load_uniter_checkpoint(target, no_tensors)


class PickledConfig:
    """Stands for the OmegaConf object MMF pickles into its .ckpt files."""


def test_prefix_mapping_option(source, target):
    state = {k.replace("uniter.", "backbone.trunk.", 1): v for k, v in source.state_dict().items()}
    report = load_uniter_checkpoint(target, state, mapping={"backbone.trunk.": "uniter."})
    assert report.missing == [] and report.unexpected == []
    assert_same_weights(source, target)


# -- MMF layout -----------------------------------------------------------------------------
def to_mmf_layout(state, task="vqa2", with_buffers=True):
    """Rename an official state dict to MMF's UNITER layout (uniter-architecture.md §7)."""
    out = {}
    for key, value in state.items():
        if key.startswith("uniter.embeddings."):
            out["uniter.uniter.text_embeddings." + key[len("uniter.embeddings."):]] = value
        elif key.startswith("uniter.img_embeddings.LayerNorm."):
            out["uniter.uniter.img_embeddings.final_layer_norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("uniter."):
            out["uniter." + key] = value
        elif key.startswith("vqa_output."):
            index, rest = key[len("vqa_output."):].split(".", 1)
            part = {"0": "classifier.1.dense", "2": "classifier.1.LayerNorm", "3": "classifier.2"}[index]
            out[f"uniter.heads.{task}.{part}.{rest}"] = value
    if with_buffers:
        out["uniter.uniter.text_embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    out[f"uniter.heads.{task}.pooler.dense.weight"] = torch.full((32, 32), 0.5)
    out[f"uniter.heads.{task}.pooler.dense.bias"] = torch.full((32,), 0.25)
    return out


def test_mmf_layout_is_detected_and_mapped(tmp_path, source, target):
    path = _save(tmp_path, "uniter_final.pth", {"model": to_mmf_layout(source.state_dict())})
    report = load_uniter_checkpoint(target, path)
    assert report.layout == "mmf"
    assert_same_weights(source, target)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == sorted([
        "uniter.uniter.text_embeddings.position_ids",
        "uniter.heads.vqa2.pooler.dense.weight",
        "uniter.heads.vqa2.pooler.dense.bias",
    ])
    assert report.renamed["uniter.heads.vqa2.classifier.1.LayerNorm.weight"] == "vqa_output.2.weight"
    final_ln = report.renamed["uniter.uniter.img_embeddings.final_layer_norm.bias"]
    assert final_ln == "uniter.img_embeddings.LayerNorm.bias"
    assert any("own pooler" in note for note in report.notes)


def test_mmf_head_pooler_can_replace_the_trunk_pooler(source, target):
    report = load_uniter_checkpoint(target, to_mmf_layout(source.state_dict()), use_mmf_head_pooler=True)
    assert torch.all(target.uniter.pooler.dense.weight == 0.5) and torch.all(target.uniter.pooler.dense.bias == 0.25)
    assert "uniter.uniter.pooler.dense.weight" in report.ignored


def test_mmf_with_several_heads_needs_a_choice(source, target):
    state = to_mmf_layout(source.state_dict(), task="vqa2")
    state.update({k: v for k, v in to_mmf_layout(source.state_dict(), task="gqa").items() if ".heads." in k})
    report = load_uniter_checkpoint(target, state)
    assert any(k.startswith("uniter.heads.gqa.") for k in report.unexpected)
    assert {"vqa_output.0.weight", "vqa_output.3.bias"} <= set(report.missing)
    assert any("mmf_head" in note for note in report.notes)
    report = load_uniter_checkpoint(target, state, mmf_head="vqa2")
    assert report.missing == []
    assert_same_weights(source, target)


def test_normalize_state_dict_maps_mmf_classification_module_layout(source):
    # A UNITERForClassification state dict (no BaseModel wrapper): "uniter.text_embeddings..."
    mmf = {k[len("uniter."):]: v for k, v in to_mmf_layout(source.state_dict(), with_buffers=False).items()}
    renamed, report = normalize_state_dict(mmf, source.state_dict().keys())
    assert report.layout == "mmf" and set(renamed) == set(source.state_dict())


# -- growth before loading fine-tuned NLVR2 / VCR checkpoints ----------------------------------
def test_grown_type_embeddings_accept_a_grown_checkpoint(tmp_path, source, target):
    grow_type_embeddings(source, 3, {2: 1})
    path = _save(tmp_path, "nlvr2-ft.pt", source.state_dict())
    with pytest.raises(CheckpointError, match=r"token_type_embeddings.weight'.*\[3, 32\].*\[2, 32\]"):
        load_uniter_checkpoint(target, path)
    grow_type_embeddings(target, 3, {2: 1})
    load_uniter_checkpoint(target, path)
    assert_same_weights(source, target)


# -- safetensors -------------------------------------------------------------------------------
def test_safetensors_export_and_load_back(tmp_path, source, target):
    path = export_safetensors(source, tmp_path / "sub" / "villa-tiny.safetensors", metadata={"task": "vqa"})
    assert not (tmp_path / "sub" / "villa-tiny.safetensors.tmp").exists()
    tensors = load_safetensors(path)
    assert set(tensors) == set(source.state_dict())
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata()["task"] == "vqa" and handle.metadata()["layout"] == "uniter-official"
    report = load_uniter_checkpoint(target, path)
    assert report.missing == [] and report.unexpected == []
    assert_same_weights(source, target)


def test_safetensors_detected_without_extension(tmp_path, source, target):
    path = export_safetensors(source, tmp_path / "weights.bin")
    load_uniter_checkpoint(target, path)
    assert_same_weights(source, target)
    with pytest.raises(CheckpointError, match="not found"):
        load_safetensors(tmp_path / "absent.safetensors")
