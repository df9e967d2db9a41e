"""Pre-training collates: official field names, packed layout, targets before masking, WRA inputs, errors."""
from __future__ import annotations

import pytest
import torch

from pretrain_testlib import itm_rows, mlm_rows, mrm_rows, raw_examples
from villa_plugin.common.errors import DataError
from villa_plugin.tasks.pretrain.collate import itm_collate, mlm_collate, mrm_collate

TRUNK_FIELDS = {"input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index", "txt_lens", "num_bbs"}


def test_mlm_collate_pads_labels_with_minus_one():
    rows = mlm_rows(raw_examples())
    batch = mlm_collate(rows)
    assert set(batch) == TRUNK_FIELDS | {"txt_labels", "task"} and batch["task"] == "mlm"
    assert batch["txt_labels"].shape == batch["input_ids"].shape
    for i, row in enumerate(rows):
        tl = len(row["input_ids"])
        assert batch["txt_labels"][i, :tl].tolist() == row["txt_labels"]
        assert (batch["txt_labels"][i, tl:] == -1).all()


@pytest.mark.parametrize("task", ["mrfr", "mrckl"])
def test_mrm_collate_targets_masks_and_packed_layout(task):
    examples = raw_examples()
    rows = mrm_rows(examples)
    batch = mrm_collate(rows, task)
    max_tl = batch["input_ids"].size(1)
    assert batch["img_masks"].dtype == torch.bool and batch["img_mask_tgt"].shape == batch["attn_masks"].shape
    expected_targets = []
    for i, (row, ex) in enumerate(zip(rows, examples)):
        tl, mask = len(row["input_ids"]), row["img_mask"]
        nbb = mask.numel()
        # img_mask_tgt marks the packed positions tl + j of the masked regions, which gather region j
        positions = batch["img_mask_tgt"][i].nonzero().flatten()
        assert positions.tolist() == (tl + mask.nonzero().flatten()).tolist()
        assert (batch["gather_index"][i, positions] == max_tl + mask.nonzero().flatten()).all()
        # masked features zeroed, others intact, boxes untouched
        assert (batch["img_feat"][i, :nbb][mask] == 0).all()
        torch.testing.assert_close(batch["img_feat"][i, :nbb][~mask], ex["img_feat"][~mask], rtol=0, atol=0)
        torch.testing.assert_close(batch["img_pos_feat"][i, :nbb], ex["img_pos_feat"], rtol=0, atol=0)
        source = ex["soft_labels"] if task == "mrckl" else ex["img_feat"]
        expected_targets.append(source[mask])
    key = "label_targets" if task == "mrckl" else "feat_targets"
    torch.testing.assert_close(batch[key], torch.cat(expected_targets), rtol=0, atol=0)  # row-major, unmasked


def test_mrc_without_soft_labels_names_the_key():
    rows = mrm_rows(raw_examples())
    del rows[1]["soft_labels"]
    with pytest.raises(DataError, match="example ex1 has no 'soft_labels'"):
        mrm_collate(rows, "mrckl")
    mrm_collate(rows, "mrfr")  # MRFR does not need them


def test_mrm_collate_rejects_rows_without_a_masked_region():
    rows = mrm_rows(raw_examples())
    rows[0]["img_mask"] = torch.zeros_like(rows[0]["img_mask"])
    with pytest.raises(DataError, match="at least one True"):
        mrm_collate(rows, "mrfr")


def test_itm_collate_ot_inputs():
    rows = itm_rows(raw_examples(), (1, 0, 1))
    batch = itm_collate(rows, with_ot=True)
    assert batch["targets"].tolist() == [1, 0, 1]
    ot = batch["ot_inputs"]
    max_tl, max_nbb, joint = batch["input_ids"].size(1), batch["img_feat"].size(1), batch["attn_masks"].size(1)
    assert ot["txt_pad"].dtype == torch.bool and ot["img_pad"].dtype == torch.bool
    for i, (tl, nbb) in enumerate(zip(batch["txt_lens"], batch["num_bbs"])):
        assert ot["ot_scatter"][i].tolist() == list(range(tl)) + list(range(max_tl, max_tl + joint - tl))
        assert ot["txt_pad"][i].tolist() == [False] * tl + [True] * (max_tl - tl)
        assert ot["img_pad"][i].tolist() == [False] * nbb + [True] * (max_nbb - nbb)
    assert ot["scatter_max"] == int(ot["ot_scatter"].max())
    assert "ot_inputs" not in itm_collate(rows, with_ot=False)


def test_itm_collate_rejects_bad_targets():
    rows = itm_rows(raw_examples(), (1, 0, 1))
    rows[0]["target"] = 2
    with pytest.raises(DataError, match="0 or 1"):
        itm_collate(rows)
    del rows[0]["target"]
    with pytest.raises(DataError, match="no 'target'"):
        itm_collate(rows)
