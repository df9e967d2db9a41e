"""UNITER batch collation: padding, shared position ids, gather index and attention masks.

The generic helpers (:func:`pad_tensors`, :func:`pad_ids`, :func:`build_gather_index`,
:func:`collate_rows`) know nothing about a task; a task's ``collate`` builds one *row* per
(text, image) pair (NLVR2 makes two per example, VCR one per candidate) and calls them.
See uniter-architecture.md §2 and data-formats.md §5.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList


def packed_positions(txt_lens: torch.Tensor, num_bbs: torch.Tensor, max_txt_len: int, width: int):
    """Vectorised packing of ``[txt_r, img_r, pad]`` rows ``width`` positions wide (no host sync).

    ``txt_lens`` / ``num_bbs`` are integer tensors ``[R]`` (or ``[R, 1]``) on one device. Row r takes
    text token p for p < tl_r, region p - tl_r (index ``max_txt_len + p - tl_r``) for
    tl_r <= p < tl_r + nbb_r, and the identity index after (masked). Returns ``(gather_index,
    attn_masks)``, LongTensors ``[R, width]``.
    """
    txt_lens = txt_lens.reshape(-1, 1).long()
    num_bbs = num_bbs.reshape(-1, 1).long().to(txt_lens.device)
    p = torch.arange(int(width), device=txt_lens.device).unsqueeze(0)
    end = txt_lens + num_bbs
    image_index = int(max_txt_len) + p - txt_lens
    gather_index = torch.where(p < txt_lens, p, torch.where(p < end, image_index, p))
    return gather_index, (p < end).long()


def build_gather_index(txt_lens: Sequence[int], num_bbs: Sequence[int], max_txt_len: int, max_bb: int):
    """Index packing ``cat([txt (B, max_txt_len), img (B, max_bb)], 1)`` into ``[txt_i, img_i, pad]``.

    Returns ``(gather_index, attn_masks)``, both LongTensor ``[B, out]`` with
    ``out = max_i(txt_lens[i] + num_bbs[i])``. Row i takes text token j at position j < tl_i, image
    token k at position tl_i + k (index ``max_txt_len + k``), and keeps the identity index beyond
    (garbage that the mask, 1 on the first ``tl_i + nbb_i`` positions, removes).
    """
    txt_lens = [int(t) for t in txt_lens]
    num_bbs = [int(n) for n in num_bbs]
    if len(txt_lens) != len(num_bbs):
        raise ValueError(f"txt_lens ({len(txt_lens)}) and num_bbs ({len(num_bbs)}) differ in length")
    if not txt_lens:
        raise DataError("Cannot build a gather index for an empty batch")
    if max(txt_lens) > max_txt_len or max(num_bbs) > max_bb:
        raise ValueError(
            f"txt_lens/num_bbs exceed the padded sizes (max_txt_len={max_txt_len}, max_bb={max_bb})"
        )
    out = max(t + n for t, n in zip(txt_lens, num_bbs))
    return packed_positions(torch.tensor(txt_lens), torch.tensor(num_bbs), max_txt_len, out)


def pad_ids(seqs: Sequence[Sequence[int]], pad: int = 0) -> torch.Tensor:
    """LongTensor ``[B, max_len]`` of token-id lists, right-padded with ``pad``."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    max_len = int(lens.max()) if len(seqs) else 0
    out = torch.full((len(seqs), max_len), pad, dtype=torch.long)
    # one tensor from all ids, scattered row-major into the places the lengths mark
    flat = torch.tensor([int(t) for s in seqs for t in s], dtype=torch.long)
    out[torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)] = flat
    return out


def pad_tensors(tensors: Sequence[torch.Tensor], lens: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Zero-pad ``[n_i, D]`` tensors (any float dtype, e.g. the img_db's fp16) to ``[B, max n_i, D]``
    float32.

    One uninitialised output, each row converted straight into its slice and only the padding
    zeroed: no intermediate float32 copy per example and no second pass over the real rows (rows
    already float32 at their length go through ``pad_sequence``, cheaper for small ones).
    """
    if lens is None:
        lens = [t.size(0) for t in tensors]
    if all(t.dtype == torch.float32 and t.size(0) == n for t, n in zip(tensors, lens)):
        return torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True)  # one call, zero padding
    max_len = max(lens)
    dim = tensors[0].size(-1)
    out = torch.empty(len(tensors), max_len, dim, dtype=torch.float32)
    for i, (t, n) in enumerate(zip(tensors, lens)):
        out[i, :n] = t[:n]
        if n < max_len:
            out[i, n:].zero_()
    return out


def collate_rows(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Collate UNITER rows (``input_ids`` with CLS/SEP, ``img_feat [n, 2048]``, ``img_pos_feat [n, 7]``,
    optional ``txt_type_ids``) into the shared model inputs: ``input_ids``, ``position_ids``,
    ``img_feat``, ``img_pos_feat``, ``attn_masks``, ``gather_index``, ``txt_lens``, ``num_bbs``
    (and ``txt_type_ids`` when every row has it).
    """
    if not rows:
        raise DataError("collate got an empty list of examples")
    txt_lens = [len(r["input_ids"]) for r in rows]
    num_bbs = [int(r["img_feat"].size(0)) for r in rows]
    for r, tl, nbb in zip(rows, txt_lens, num_bbs):
        where = r.get("id", "?")
        if tl == 0:
            raise DataError(f"Example {where} has empty text (no input ids); it cannot be collated.")
        if nbb == 0:
            raise DataError(f"Example {where} has zero image regions; it cannot be collated.")
        if r["img_pos_feat"].size(0) != nbb:
            raise DataError(f"Example {where}: img_feat has {nbb} rows but img_pos_feat has {r['img_pos_feat'].size(0)}")
    input_ids = pad_ids([r["input_ids"] for r in rows])
    max_tl = input_ids.size(1)
    img_feat = pad_tensors([r["img_feat"] for r in rows], num_bbs)
    img_pos_feat = pad_tensors([r["img_pos_feat"] for r in rows], num_bbs)
    gather_index, attn_masks = build_gather_index(txt_lens, num_bbs, max_tl, img_feat.size(1))
    out = {
        "input_ids": input_ids,
        "position_ids": torch.arange(max_tl, dtype=torch.long).unsqueeze(0),
        "img_feat": img_feat,
        "img_pos_feat": img_pos_feat,
        "attn_masks": attn_masks,
        "gather_index": gather_index,
        "txt_lens": txt_lens,
        "num_bbs": num_bbs,
    }
    if all("txt_type_ids" in r for r in rows):
        out["txt_type_ids"] = pad_ids([r["txt_type_ids"] for r in rows])
    return out


def soft_targets(labels_scores: Sequence[Optional[Dict[str, Sequence]]], num_answers: int) -> torch.Tensor:
    """Dense ``[B, num_answers]`` soft-score targets from ``{'labels': [...], 'scores': [...]}``
    (``None`` or empty gives a zero row)."""
    targets = torch.zeros(len(labels_scores), num_answers, dtype=torch.float32)
    rows: List[int] = []
    flat_labels: List[Any] = []
    flat_scores: List[Any] = []
    per_row = []
    for i, t in enumerate(labels_scores):
        if not t:
            continue
        labels, scores = list(t.get("labels", [])), list(t.get("scores", []))
        if labels:
            if max(labels) >= num_answers or min(labels) < 0:
                raise DataError(
                    f"Answer label {max(labels)} is outside the answer vocabulary of {num_answers}; "
                    f"check num_answers against the ans2label file used to build the txt_db."
                )
            per_row.append((i, labels, scores))
            rows += [i] * len(labels)
            flat_labels += labels
            flat_scores += scores
    # one scatter for the whole batch, unless a row repeats a label or has a score list of another
    # length: then row by row, as index assignment defines those cases
    if len(flat_scores) == len(rows) and len(set(zip(rows, flat_labels))) == len(rows):
        if rows:
            targets[torch.tensor(rows), torch.as_tensor(flat_labels, dtype=torch.long)] = torch.as_tensor(
                flat_scores, dtype=torch.float32)
    else:
        for i, labels, scores in per_row:
            targets[i, torch.as_tensor(labels, dtype=torch.long)] = torch.as_tensor(scores, dtype=torch.float32)
    return targets


def vqa_collate(examples: List[Dict[str, Any]], num_answers: int, dataset_name: str, dataset_type: str) -> SampleList:
    """VQA batch (data-formats.md §5): the shared inputs plus ``targets [B, num_answers]`` and ``qids``."""
    batch = collate_rows(examples)
    batch["qids"] = [e["id"] for e in examples]
    if all(e.get("target") is not None for e in examples):
        batch["targets"] = soft_targets([e["target"] for e in examples], num_answers)
    batch["dataset_name"] = dataset_name
    batch["dataset_type"] = dataset_type
    return SampleList(batch)
