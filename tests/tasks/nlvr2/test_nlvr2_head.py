"""NLVR2 paired-attention head: official key names and shapes, the paired forward, type-embedding
growth with the checkpoint loading order, the KL reduction, and the consistency metric."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from uniter_testlib import TINY_ARCH, make_batch, tiny_model_config

from villa_plugin.adversarial.losses import reduce_kl, symmetric_kl
from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.tasks.nlvr2.metrics import Nlvr2Consistency, nlvr2_sentence_key
from villa_plugin.tasks.nlvr2.head import Nlvr2PairedAttnHead
from villa_plugin.models.registered import UNITER

H = TINY_ARCH["hidden_size"]


def build(**overrides) -> UNITER:
    cfg = tiny_model_config(head="nlvr2_paired_attn", num_labels=2, losses=[{"type": "cross_entropy"}])
    cfg.update(overrides)
    model = UNITER(OmegaConf.create(cfg))
    model.build()
    model.init_losses()
    return model


def paired_batch(n_examples=3, seed=0) -> SampleList:
    """2 rows per example (left, right) with image type ids 1 / 2 and targets [n_examples]."""
    txt = [5, 5, 7, 7, 4, 4][: 2 * n_examples]
    nbb = [3, 6, 4, 2, 5, 5][: 2 * n_examples]
    batch = make_batch(txt, nbb, seed=seed)
    batch["img_type_ids"] = torch.tensor([[1 + r % 2] * max(nbb) for r in range(2 * n_examples)])
    batch["targets"] = torch.tensor([1, 0, 1][:n_examples])
    batch["dataset_name"] = "nlvr2"
    return batch


def test_state_dict_keys_are_the_official_top_level_names():
    model = build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("uniter.")}
    assert shapes == {
        "attn1.in_proj_weight": (3 * H, H), "attn1.in_proj_bias": (3 * H,),
        "attn1.out_proj.weight": (H, H), "attn1.out_proj.bias": (H,),
        "attn2.in_proj_weight": (3 * H, H), "attn2.in_proj_bias": (3 * H,),
        "attn2.out_proj.weight": (H, H), "attn2.out_proj.bias": (H,),
        "fc.0.weight": (H, 2 * H), "fc.0.bias": (H,),
        "attn_pool.fc.0.weight": (1, H), "attn_pool.fc.0.bias": (1,),
        "nlvr2_output.weight": (2, 2 * H), "nlvr2_output.bias": (2,),
    }
    assert isinstance(model.head, Nlvr2PairedAttnHead) and model.head.nlvr2_output is model.nlvr2_output
    assert model.kl_reduction == "sum_classes_mean"


def test_head_init_follows_the_reference():
    model = build()
    # out_proj is a Linear: N(0, 0.02) and bias 0; in_proj keeps MultiheadAttention's xavier init
    assert model.attn1.out_proj.bias.abs().max() == 0 and abs(model.attn1.out_proj.weight.std().item() - 0.02) < 0.006
    assert model.attn1.in_proj_weight.std().item() > 0.1


def test_paired_forward_gives_one_row_of_logits_per_example_and_respects_padding():
    model = build(dropout=0.0).eval()
    batch = paired_batch()
    out = model(batch)
    assert out["scores"].shape == (3, 2)
    assert set(out["losses"]) == {"train/nlvr2/cross_entropy"}
    # changing what sits in padded region slots does not change anything (attention and pooling masks)
    padded = SampleList(dict(batch))
    padded["img_feat"] = batch["img_feat"].clone()
    padded["img_feat"][0, 3:] = 5.0  # row 0 has 3 regions, the slots after are padding
    assert torch.allclose(model(padded)["scores"], out["scores"], atol=1e-5)
    # swapping the two images of an example changes its prediction (left and right are not pooled alike)
    swapped = SampleList(dict(batch))
    order = torch.tensor([1, 0, 2, 3, 4, 5])
    for key in ("input_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index"):
        swapped[key] = batch[key][order]
    assert not torch.allclose(model(swapped)["scores"][0], out["scores"][0])


def test_an_odd_number_of_rows_is_an_error():
    model = build()
    with pytest.raises(ValueError, match="two rows per example"):
        model(make_batch([4, 4, 4], [2, 2, 2]))


def test_perturbation_is_per_row():
    model = build()
    batch = paired_batch()
    shapes = model.perturbation_shapes(batch)
    assert shapes["text"][0] == 6 and shapes["image"][0] == 6  # 2 rows per example, one delta each
    delta = torch.randn(shapes["text"]) * 1e-3
    assert model(batch, perturbation={"text": delta, "image": None})["scores"].shape == (3, 2)


def test_kl_reduction_is_sum_over_classes_mean_over_examples():
    model = build()
    adv, clean = torch.randn(4, 2), torch.randn(4, 2)
    kl = symmetric_kl(adv, clean)
    assert torch.allclose(reduce_kl(kl, model.kl_reduction), kl.sum(1).mean())


def test_wrong_num_labels_is_a_config_error():
    with pytest.raises(ConfigError, match="num_labels: 2"):
        build(num_labels=3)


# -- type embeddings and checkpoint loading order ----------------------------------------------
def _trunk_state(type_rows: int, fill: float = 0.0):
    """An official-layout checkpoint of a tiny trunk with ``type_rows`` type rows (distinct rows)."""
    reference = build()
    state = {k: v.clone() for k, v in reference.state_dict().items() if k.startswith("uniter.")}
    state["uniter.embeddings.token_type_embeddings.weight"] = (
        torch.arange(type_rows, dtype=torch.float32)[:, None].repeat(1, H) + fill
    )
    return state


def test_without_checkpoint_the_type_table_grows_to_three_rows_copying_the_image_row():
    table = build().uniter.embeddings.token_type_embeddings.weight
    assert table.shape == (3, H) and torch.equal(table[2], table[1])


def test_pretrained_checkpoint_loads_before_the_growth(tmp_path):
    path = tmp_path / "villa-tiny.pt"
    torch.save({"model_state": _trunk_state(2)}, path)
    model = build(pretrained_checkpoint=str(path))
    table = model.uniter.embeddings.token_type_embeddings.weight
    assert table.shape == (3, H)
    assert torch.equal(table[0], torch.zeros(H)) and torch.equal(table[1], torch.ones(H))
    assert torch.equal(table[2], table[1])  # row 2 := the loaded row 1
    assert "nlvr2_output.weight" in model.load_report.missing
    assert any("grown after loading" in note for note in model.load_report.notes)


def test_finetuned_checkpoint_with_three_rows_loads_after_the_growth(tmp_path):
    path = tmp_path / "nlvr2-finetuned.pt"
    state = _trunk_state(3, fill=0.5)
    head = build().state_dict()
    state.update({k: torch.full_like(v, 0.25) for k, v in head.items() if not k.startswith("uniter.")})
    torch.save(state, path)
    model = build(pretrained_checkpoint=str(path))
    table = model.uniter.embeddings.token_type_embeddings.weight
    assert torch.equal(table[2], torch.full((H,), 2.5))  # the file's own row 2, not a copy of row 1
    assert torch.equal(model.attn1.in_proj_weight, torch.full((3 * H, H), 0.25))
    assert model.load_report.missing == []


def test_checkpoint_with_other_type_rows_is_rejected_by_name(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save(_trunk_state(5), path)
    with pytest.raises(CheckpointError, match=r"token_type_embeddings rows = 5.*expects 2 .*or 3"):
        build(pretrained_checkpoint=str(path))


# -- consistency ---------------------------------------------------------------------------------
def test_sentence_key_drops_the_third_field():
    assert nlvr2_sentence_key("dev-850-0-1") == "dev-850-1"
    assert nlvr2_sentence_key("test1-3-2-0") == "test1-3-0"
    with pytest.raises(ValueError):
        nlvr2_sentence_key("dev-850")


def test_consistency_on_hand_examples_and_across_ranks():
    identifiers = ["dev-1-0-0", "dev-1-1-0", "dev-1-0-1", "dev-2-0-0", "dev-2-1-0", "dev-2-2-0"]
    sentences = sorted({nlvr2_sentence_key(i) for i in identifiers})
    index = torch.tensor([sentences.index(nlvr2_sentence_key(i)) for i in identifiers])
    targets = torch.tensor([1, 0, 1, 1, 1, 0])
    predicted = torch.tensor([1, 0, 0, 1, 1, 0])  # sentence dev-1-1 wrong; dev-1-0 and dev-2-0 all right
    scores = torch.nn.functional.one_hot(predicted, 2).float()

    def batch(rows):
        return {"targets": targets[rows], "sentence_index": index[rows], "num_sentences": len(sentences)}, {"scores": scores[rows]}

    metric = Nlvr2Consistency()
    metric.update(*batch(slice(0, 6)))
    assert metric.compute() == pytest.approx(2 / 3)
    # two "ranks" with their own examples of the same sentences: summing the vectors gives the same
    rank0, rank1 = Nlvr2Consistency(), Nlvr2Consistency()
    rank0.update(*batch(torch.tensor([0, 2, 4])))
    rank1.update(*batch(torch.tensor([1, 3, 5])))
    other = torch.cat([rank1.seen, rank1.wrong])
    rank0.reduce(lambda packed: packed + other)
    assert rank0.compute() == pytest.approx(2 / 3)
