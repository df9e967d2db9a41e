"""Collate pre-training rows into the batches the official pre-training code feeds (uniter-pretraining.md §3-§7).

A *row* is one (caption, image) example, already masked (see :mod:`.masking`):
``input_ids`` (with ``[CLS]``/``[SEP]``), ``img_feat`` ``[n, 2048]``, ``img_pos_feat`` ``[n, 7]``, and
per task ``txt_labels`` (MLM), ``img_mask`` ``[n]`` bool (MRFR/MRC), ``soft_labels`` ``[n, 1601]``
(MRC), ``target`` 0/1 (ITM). The batch fields keep the official names: ``input_ids``,
``position_ids``, ``img_feat``, ``img_pos_feat``, ``attn_masks``, ``gather_index``, ``txt_labels``,
``img_masks``, ``img_mask_tgt``, ``feat_targets``, ``label_targets``, ``targets``, ``ot_inputs``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.collate import collate_rows, pad_ids, pad_tensors
from villa_plugin.tasks.pretrain.masking import IGNORE_LABEL, region_mask_target


def _row_name(row: Dict[str, Any], index: int) -> str:
    return f"example {row.get('id', index)}"


def _field(rows: Sequence[Dict[str, Any]], key: str, task: str, hint: str = "") -> List[Any]:
    values = []
    for index, row in enumerate(rows):
        if row.get(key) is None:
            raise DataError(f"{task} collate: {_row_name(row, index)} has no '{key}'.{hint}")
        values.append(row[key])
    return values


def mlm_collate(rows: List[Dict[str, Any]]) -> SampleList:
    """Trunk inputs + ``txt_labels`` ``[B, max_tl]`` (-1 on unmasked tokens, specials and padding)."""
    batch = collate_rows(rows)
    labels = _field(rows, "txt_labels", "mlm")
    for index, (row, label) in enumerate(zip(rows, labels)):
        if len(label) != len(row["input_ids"]):
            raise DataError(f"mlm collate: {_row_name(row, index)} has {len(label)} txt_labels for "
                            f"{len(row['input_ids'])} input_ids.")
    batch["txt_labels"] = pad_ids(labels, pad=IGNORE_LABEL)
    return SampleList(batch, task="mlm")


def mrm_collate(rows: List[Dict[str, Any]], task: str = "mrfr") -> SampleList:
    """MRFR / MRC batch: ``img_masks`` ``[B, max_nbb]``, ``img_mask_tgt`` ``[B, out]`` (packed layout),
    targets from the **unmasked** features (``feat_targets`` ``[n, 2048]`` for MRFR, ``label_targets``
    ``[n, 1601]`` from ``soft_labels`` for MRC), then the masked regions' features zeroed (boxes kept)."""
    if not task.startswith(("mrfr", "mrc")):
        raise DataError(f"mrm_collate serves mrfr / mrc / mrckl, got task {task!r}.")
    batch = collate_rows(rows)
    masks = _field(rows, "img_mask", task)
    for index, (row, mask, nbb) in enumerate(zip(rows, masks, batch["num_bbs"])):
        if mask.numel() != nbb or not bool(mask.any()):
            raise DataError(f"{task} collate: {_row_name(row, index)} needs an img_mask of {nbb} regions with at "
                            f"least one True, got {mask.numel()} with {int(mask.sum())} True.")
    img_masks = torch.zeros(batch["img_feat"].shape[:2], dtype=torch.bool)
    for i, mask in enumerate(masks):
        img_masks[i, : mask.numel()] = mask.bool()
    img_mask_tgt = torch.zeros(batch["attn_masks"].shape, dtype=torch.bool)
    for i, (mask, tl) in enumerate(zip(masks, batch["txt_lens"])):
        row_tgt = region_mask_target(mask, tl)
        img_mask_tgt[i, : row_tgt.numel()] = row_tgt
    if task.startswith("mrc"):
        hint = (" MRC needs the detector's soft_labels [n, 1601]: use an img_db that stores 'soft_labels', or "
                "drop mrc/mrckl from this dataset's tasks.")
        soft = pad_tensors(_field(rows, "soft_labels", task, hint), batch["num_bbs"])
        batch["label_targets"] = soft[img_masks]
    else:
        batch["feat_targets"] = batch["img_feat"][img_masks]
    batch["img_feat"] = batch["img_feat"].masked_fill(img_masks.unsqueeze(-1), 0)
    batch.update(img_masks=img_masks, img_mask_tgt=img_mask_tgt)
    return SampleList(batch, task=task)


def ot_inputs(txt_lens: Sequence[int], num_bbs: Sequence[int], max_txt_len: int, max_num_bb: int,
              joint_len: int) -> Dict[str, Any]:
    """WRA inputs: ``ot_scatter`` (packed position p >= tl_i -> ``max_tl + p - tl_i``), ``scatter_max``,
    ``txt_pad`` ``[B, max_tl]`` and ``img_pad`` ``[B, max_nbb]`` (bool, True = padding)."""
    scatter = torch.arange(joint_len, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, tl in enumerate(txt_lens):
        scatter[i, tl:] = torch.arange(max_txt_len, max_txt_len + joint_len - tl, dtype=torch.long)
    positions_txt = torch.arange(max_txt_len)[None]
    positions_img = torch.arange(max_num_bb)[None]
    return {
        "ot_scatter": scatter,
        "scatter_max": int(scatter.max()),
        "txt_pad": positions_txt >= torch.as_tensor(list(txt_lens))[:, None],
        "img_pad": positions_img >= torch.as_tensor(list(num_bbs))[:, None],
    }


def itm_collate(rows: List[Dict[str, Any]], with_ot: bool = True) -> SampleList:
    """Trunk inputs + ``targets`` ``[B]`` (1 = matched); ``ot_inputs`` when ``with_ot`` (WRA, λ > 0)."""
    batch = collate_rows(rows)
    targets = _field(rows, "target", "itm")
    if any(int(t) not in (0, 1) for t in targets):
        raise DataError(f"itm collate: targets must be 0 or 1, got {sorted({int(t) for t in targets})}.")
    batch["targets"] = torch.as_tensor([int(t) for t in targets], dtype=torch.long)
    if with_ot:
        batch["ot_inputs"] = ot_inputs(batch["txt_lens"], batch["num_bbs"], batch["input_ids"].size(1),
                                       batch["img_feat"].size(1), batch["attn_masks"].size(1))
    return SampleList(batch, task="itm")


__all__ = ["mlm_collate", "mrm_collate", "itm_collate", "ot_inputs"]
