"""UNITER collation: padding, shared position ids, gather index, attention masks, VQA targets."""
import pytest
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.collate import build_gather_index, collate_rows, soft_targets, vqa_collate


def _row(qid, ids, nbb, target=None, fill=1.0):
    return {"id": qid, "input_ids": ids, "img_feat": torch.full((nbb, 2048), fill),
            "img_pos_feat": torch.full((nbb, 7), fill), "target": target}


def test_gather_index_matches_hand_built_two_example_batch():
    # row 0: 3 text + 2 regions; row 1: 5 text + 4 regions; max_tl=5, max_bb=4, out=9
    gather, mask = build_gather_index([3, 5], [2, 4], max_txt_len=5, max_bb=4)
    assert gather.tolist() == [
        [0, 1, 2, 5, 6, 5, 6, 7, 8],   # text 0..2, images at 5+0, 5+1, then identity (masked)
        [0, 1, 2, 3, 4, 5, 6, 7, 8],   # text 0..4, images 5..8
    ]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0], [1] * 9]
    assert gather.dtype == mask.dtype == torch.long


def test_gather_index_packs_text_then_regions():
    txt = torch.arange(2 * 4).view(2, 4, 1).float()          # text token values 0..7
    img = 100 + torch.arange(2 * 3).view(2, 3, 1).float()    # image token values 100..105
    gather, mask = build_gather_index([2, 4], [3, 1], 4, 3)
    packed = torch.gather(torch.cat([txt, img], 1), 1, gather.unsqueeze(-1)).squeeze(-1)
    assert packed[0, :5].tolist() == [0, 1, 100, 101, 102]
    assert packed[1, :5].tolist() == [4, 5, 6, 7, 103]
    assert mask.sum(1).tolist() == [5, 5]


def test_gather_index_rejects_bad_sizes():
    with pytest.raises(ValueError):
        build_gather_index([6], [2], max_txt_len=5, max_bb=4)
    with pytest.raises(DataError):
        build_gather_index([], [], 1, 1)


def test_vqa_collate_fields_and_shapes():
    examples = [_row(11, [2, 5, 6, 3], 2, {"labels": [0, 2], "scores": [1.0, 0.3]}, fill=1.0),
                _row(12, [2, 7, 3], 3, {"labels": [1], "scores": [0.6]}, fill=2.0)]
    batch = vqa_collate(examples, num_answers=4, dataset_name="vqa2", dataset_type="train")
    assert isinstance(batch, SampleList)
    assert batch.input_ids.tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3]]
    assert batch.img_feat.shape == (2, 3, 2048) and batch.img_pos_feat.shape == (2, 3, 7)
    assert batch.img_feat[0, 2].abs().sum() == 0 and batch.img_feat[1, 2, 0] == 2.0  # zero padding
    assert batch.attn_masks.tolist() == [[1] * 6, [1] * 6]
    assert batch.gather_index.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 4, 5, 6]]
    assert batch.targets.tolist() == [[1.0, 0.0, pytest.approx(0.3), 0.0], [0.0, pytest.approx(0.6), 0.0, 0.0]]
    assert batch.qids == [11, 12] and batch.txt_lens == [4, 3] and batch.num_bbs == [2, 3]
    assert batch.dataset_name == "vqa2" and batch.dataset_type == "train"


def test_batch_of_one_and_unlabelled():
    batch = vqa_collate([_row(1, [2, 3], 1)], 4, "vqa2", "test")
    assert batch.input_ids.shape == (1, 2) and batch.attn_masks.tolist() == [[1, 1, 1]]
    assert "targets" not in batch


def test_empty_text_zero_regions_and_empty_batch_are_data_errors():
    with pytest.raises(DataError, match="Example 7 has empty text"):
        collate_rows([_row(7, [], 2)])
    with pytest.raises(DataError, match="Example 8 has zero image regions"):
        collate_rows([_row(8, [2, 3], 0)])
    with pytest.raises(DataError, match="empty list"):
        collate_rows([])


def test_generic_rows_keep_type_ids():
    rows = [dict(_row(1, [2, 5, 3], 2), txt_type_ids=[0, 0, 0]), dict(_row(1, [2, 6, 6, 3], 1), txt_type_ids=[0, 1, 1, 1])]
    out = collate_rows(rows)
    assert out["txt_type_ids"].tolist() == [[0, 0, 0, 0], [0, 1, 1, 1]]


def test_soft_targets_reject_labels_outside_vocabulary():
    assert soft_targets([None, {"labels": [], "scores": []}], 3).sum() == 0
    with pytest.raises(DataError, match="outside the answer vocabulary of 3"):
        soft_targets([{"labels": [3], "scores": [1.0]}], 3)
