"""Pre-training checkpoints both ways: official files into the pre-training heads, ours into fine-tuning."""
from __future__ import annotations

import pytest
import torch

from pretrain_testlib import TINY_ARCH, tiny_model
from villa_plugin.common.errors import CheckpointError
from villa_plugin.backbones.uniter.checkpoint_keys import export_safetensors
from villa_plugin.models.registered import UNITER
from villa_plugin.tasks.pretrain.checkpoint import load_pretraining_checkpoint

ARCH = {k: v for k, v in TINY_ARCH.items() if not k.endswith("dropout_prob")}


def assert_state_equal(source: torch.nn.Module, target: torch.nn.Module, keys):
    s, t = source.state_dict(), target.state_dict()
    for key in keys:
        torch.testing.assert_close(t[key].float(), s[key].float(), rtol=0, atol=0, msg=key)


def official_file(tmp_path, state, name="uniter-tiny.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_official_pretraining_file_loads_every_head_and_keeps_ties(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    # the released layout: apex O2 fp16, wrapped, 'bert' names (the VILLA scripts rename them)
    state = {k.replace("uniter", "bert"): v.half() for k, v in source.state_dict().items()}
    report = load_pretraining_checkpoint(target, official_file(tmp_path, {"model_state": state}))
    assert report.missing == [] and report.unexpected == []
    source_half = {k: v.half().float() for k, v in source.state_dict().items()}
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, source_half[key], rtol=0, atol=0, msg=key)
    assert target.cls.predictions.decoder.weight is target.uniter.embeddings.word_embeddings.weight
    assert target.feat_regress.weight is target.uniter.img_embeddings.img_linear.weight


def test_bert_init_file_reports_the_absent_heads(tmp_path, caplog):
    """uniter-*-init.pt is converted BERT: trunk text part + cls.*, plus cls.seq_relationship (unused)."""
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    state = {k.replace("uniter.", "bert."): v for k, v in source.state_dict().items()
             if k.startswith(("uniter.embeddings.", "uniter.encoder.", "uniter.pooler.", "cls."))}
    state["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    report = load_pretraining_checkpoint(target, state)
    assert "cls.seq_relationship.weight" in report.unexpected
    assert any("['feat_regress', 'region_classifier', 'itm_output']" in note for note in report.notes)
    assert "uniter.img_embeddings.img_linear.weight" in report.missing
    assert_state_equal(source, target, [k for k in state if k.startswith("cls.pred")])


def test_a_broken_tie_in_the_file_is_an_error_naming_both_keys(tmp_path):
    state = tiny_model(seed=1).state_dict()
    state["feat_regress.weight"] = state["feat_regress.weight"] + 1
    with pytest.raises(CheckpointError, match="'feat_regress.weight' and 'uniter.img_embeddings.img_linear.weight'"):
        load_pretraining_checkpoint(tiny_model(seed=2), state)


def test_head_only_copy_of_a_tie_fills_the_shared_tensor():
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    state = dict(source.state_dict())
    del state["uniter.embeddings.word_embeddings.weight"]
    report = load_pretraining_checkpoint(target, state)
    assert_state_equal(source, target, ["uniter.embeddings.word_embeddings.weight"])
    assert any("tied copy 'cls.predictions.decoder.weight'" in note for note in report.notes)


def finetune_model(checkpoint: str, head: str = "vqa", num_labels: int = 5) -> UNITER:
    model = UNITER({"uniter_config": "base", "architecture": dict(ARCH), "dropout": 0.0, "head": head,
                    "num_labels": num_labels, "pretrained_checkpoint": checkpoint})
    model.build()
    return model


@pytest.mark.parametrize("head, num_labels", [("vqa", 5), ("nlvr2_paired_attn", 2)])
@pytest.mark.parametrize("fmt", ["trainer", "safetensors"])
def test_our_pretraining_checkpoint_is_a_pretrained_checkpoint_for_fine_tuning(tmp_path, head, num_labels, fmt):
    pretrained = tiny_model(seed=3)
    if fmt == "trainer":  # what our trainer's checkpoint holds: {"model": state_dict, ...}
        path = official_file(tmp_path, {"model": pretrained.state_dict(), "num_updates": 7}, "current.ckpt")
    else:
        path = export_safetensors(pretrained, tmp_path / "pretrain.safetensors")
    model = finetune_model(path, head=head, num_labels=num_labels)
    trunk_keys = [k for k in pretrained.state_dict() if k.startswith("uniter.")]
    report = model.load_report
    assert sorted(k for k in report.loaded) == sorted(trunk_keys)
    assert set(report.unexpected) == {k for k in pretrained.state_dict() if not k.startswith("uniter.")}
    assert all(not k.startswith("uniter.") for k in report.missing)
    fine, pre = model.state_dict(), pretrained.state_dict()
    for key in trunk_keys:
        if key == "uniter.embeddings.token_type_embeddings.weight" and head == "nlvr2_paired_attn":
            grown = fine[key]  # grown after loading: rows 0, 1 from the checkpoint, row 2 := row 1
            torch.testing.assert_close(grown[:2], pre[key], rtol=0, atol=0)
            torch.testing.assert_close(grown[2], pre[key][1], rtol=0, atol=0)
            continue
        torch.testing.assert_close(fine[key], pre[key], rtol=0, atol=0, msg=key)
