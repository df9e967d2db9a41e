"""VCR head: key names and shapes, type/vocabulary growth with the checkpoint loading order, the KL
reduction, and the Q->A / QA->R / Q->AR metrics (8- and 20-row layouts, per-question indexing)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from uniter_testlib import TINY_ARCH, make_batch, tiny_model_config

from villa_plugin.adversarial.losses import reduce_kl, symmetric_kl
from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.tasks.vcr.metrics import VcrQA, VcrQAR, VcrQAtoR, vcr_rationale_scores
from villa_plugin.models.registered import UNITER

H, V = TINY_ARCH["hidden_size"], TINY_ARCH["vocab_size"]
TYPE_KEY = "uniter.embeddings.token_type_embeddings.weight"
WORD_KEY = "uniter.embeddings.word_embeddings.weight"


def build(**overrides) -> UNITER:
    cfg = tiny_model_config(head="vcr", num_labels=2, losses=[{"type": "cross_entropy"}])
    cfg.update(overrides)
    model = UNITER(OmegaConf.create(cfg))
    model.build()
    model.init_losses()
    return model


def test_head_keys_shapes_and_layers():
    model = build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("uniter.")}
    assert shapes == {
        "vcr_output.0.weight": (2 * H, H), "vcr_output.0.bias": (2 * H,),
        "vcr_output.2.weight": (2 * H,), "vcr_output.2.bias": (2 * H,),
        "vcr_output.3.weight": (2, 2 * H), "vcr_output.3.bias": (2,),
    }
    assert isinstance(model.vcr_output[1], nn.ReLU) and isinstance(model.vcr_output[2], nn.LayerNorm)
    assert model.kl_reduction == "mean"


def test_rows_forward_and_kl_mean_over_rows_and_classes():
    model = build()
    batch = make_batch([6, 6, 9, 9], [3, 3, 3, 3])
    batch["txt_type_ids"] = torch.tensor([[0, 0, 0, 2, 2, 2, 0, 0, 0]] * 2 + [[0, 0, 0, 2, 2, 3, 3, 3, 3]] * 2)
    batch["targets"] = torch.tensor([1, 0, 0, 1])
    out = model(batch)
    assert out["scores"].shape == (4, 2)
    assert torch.isfinite(out["losses"]["train/vqa2/cross_entropy"])
    kl = symmetric_kl(torch.randn(8, 2), torch.randn(8, 2))
    assert torch.allclose(reduce_kl(kl, model.kl_reduction), kl.mean())
    assert torch.allclose(reduce_kl(kl, model.kl_reduction) * 2, kl.sum(1).mean())  # half the NLVR2 convention


def test_wrong_num_labels_is_a_config_error():
    with pytest.raises(ConfigError, match="num_labels: 2"):
        build(num_labels=4)


# -- growth and loading order --------------------------------------------------------------------
def test_growth_without_checkpoint():
    model = build()
    types, words = model.uniter.embeddings.token_type_embeddings.weight, model.uniter.embeddings.word_embeddings.weight
    assert types.shape == (4, H) and torch.equal(types[2], types[0]) and torch.equal(types[3], types[0])
    assert words.shape == (V + 81, H)
    assert 0.01 < words[V:].std().item() < 0.03  # new tag rows ~ N(0, 0.02)


def _checkpoint(type_rows: int, vocab: int):
    state = {k: v.clone() for k, v in build().state_dict().items() if k.startswith("uniter.")}
    state[TYPE_KEY] = torch.arange(type_rows, dtype=torch.float32)[:, None].repeat(1, H) + 1
    state[WORD_KEY] = torch.full((vocab, H), 0.5)
    return state


def test_pretrained_checkpoint_loads_before_growth(tmp_path):
    path = tmp_path / "uniter-tiny.pt"
    state = _checkpoint(2, V)
    torch.save({"bert." + k[len("uniter."):]: v for k, v in state.items()}, path)  # released files may use bert.*
    model = build(pretrained_checkpoint=str(path))
    types, words = model.uniter.embeddings.token_type_embeddings.weight, model.uniter.embeddings.word_embeddings.weight
    assert types.shape == (4, H) and words.shape == (V + 81, H)
    assert torch.equal(types[:2], state[TYPE_KEY])
    assert torch.equal(types[2], state[TYPE_KEY][0]) and torch.equal(types[3], state[TYPE_KEY][0])
    assert torch.equal(words[:V], state[WORD_KEY]) and not torch.equal(words[V:], torch.full((81, H), 0.5))


def test_second_stage_checkpoint_loads_after_growth(tmp_path):
    path = tmp_path / "villa-tiny-vcr-2nd-stage.pt"
    state = _checkpoint(4, V + 81)
    torch.save({"model_state": {k: v.half() for k, v in state.items()}}, path)  # apex O2 files are fp16
    model = build(pretrained_checkpoint=str(path))
    types, words = model.uniter.embeddings.token_type_embeddings.weight, model.uniter.embeddings.word_embeddings.weight
    assert torch.equal(types, state[TYPE_KEY]) and torch.equal(words, state[WORD_KEY])
    assert types.dtype == torch.float32


def test_mixed_embedding_shapes_are_rejected(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save(_checkpoint(4, V), path)
    with pytest.raises(CheckpointError, match="mixes grown and pretrained"):
        build(pretrained_checkpoint=str(path))
    torch.save(_checkpoint(2, V + 5), path)
    with pytest.raises(CheckpointError, match=f"word_embeddings rows = {V + 5}"):
        build(pretrained_checkpoint=str(path))


# -- metrics -------------------------------------------------------------------------------------
def _logits(row_scores):
    """[rows, 2] logits whose column 1 is ``row_scores`` (column 0 is noise the metrics must ignore)."""
    row_scores = torch.tensor(row_scores, dtype=torch.float32)
    return torch.stack([torch.randn_like(row_scores) * 10, row_scores], dim=1)


def _run(metric_cls, batch, output):
    metric = metric_cls()
    metric.update(batch, output)
    return metric.compute()


def test_metrics_with_eight_rows_per_question():
    # question 0: answer 2 best (right), rationale 1 best (right); question 1: answer 0 best (wrong), rationale right
    rows = [0, 1, 5, 2, 0, 9, 1, 2,
            7, 1, 2, 3, 4, 0, 0, 1]
    batch = {"qa_targets": torch.tensor([2, 3]), "qar_targets": torch.tensor([1, 0])}
    output = {"scores": _logits(rows)}
    assert _run(VcrQA, batch, output) == pytest.approx(0.5)
    assert _run(VcrQAR, batch, output) == pytest.approx(1.0)
    assert _run(VcrQAtoR, batch, output) == pytest.approx(0.5)


def test_twenty_rows_pick_the_rationales_after_each_questions_own_gt_answer():
    # two questions with different gt answers (1 and 3): the rationale block is chosen per question
    q0 = [0, 9, 0, 0] + [0, 0, 0, 0] + [0, 0, 0, 8] + [9, 0, 0, 0] + [0, 0, 0, 0]  # gt answer 1 -> block 1: best 3
    q1 = [0, 0, 0, 9] + [0, 7, 0, 0] + [0, 0, 0, 0] + [0, 0, 0, 0] + [0, 0, 6, 0]  # gt answer 3 -> block 3: best 2
    scores = torch.tensor([q0, q1], dtype=torch.float32)
    answers = torch.tensor([1, 3])
    assert vcr_rationale_scores(scores, answers).argmax(-1).tolist() == [3, 2]
    batch = {"qa_targets": answers, "qar_targets": torch.tensor([3, 2])}
    output = {"scores": _logits(q0 + q1)}
    assert _run(VcrQAtoR, batch, output) == pytest.approx(1.0)
    # the official code's batch-wide index (question 0's answer for every row) would get question 1 wrong
    wrong = scores[:, 4 + 4 * 1: 8 + 4 * 1].argmax(-1).tolist()
    assert wrong[1] != 2


def test_unlabelled_batches_are_skipped():
    metric = VcrQA()
    metric.update({}, {"scores": _logits([0.0] * 20)})
    assert metric.total == 0 and metric.compute() == 0.0
