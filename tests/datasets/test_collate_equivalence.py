"""The vectorised collation gives bit-identical batches to the straightforward per-example loops
it replaced (kept here as the reference), for fp32 rows and for the img_db's fp16 rows."""
import numpy as np
import pytest
import torch

from datasets_testlib import region_record
from villa_plugin.datasets.collate import (
    build_gather_index, collate_rows, pad_ids, pad_tensors, soft_targets, vqa_collate,
)
from villa_plugin.datasets.features import ImgFeatDB, write_img_db


# -- the reference: the per-example loops collate.py used before (commit 984c5f5) -------------------
def ref_gather_index(txt_lens, num_bbs, max_txt_len, max_bb):
    batch, out = len(txt_lens), max(t + n for t, n in zip(txt_lens, num_bbs))
    gather_index = torch.arange(out, dtype=torch.long).unsqueeze(0).repeat(batch, 1)
    attn_masks = torch.zeros(batch, out, dtype=torch.long)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        gather_index[i, tl: tl + nbb] = torch.arange(max_txt_len, max_txt_len + nbb, dtype=torch.long)
        attn_masks[i, : tl + nbb] = 1
    return gather_index, attn_masks


def ref_pad_ids(seqs, pad=0):
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def ref_pad_tensors(tensors, lens):
    out = torch.zeros(len(tensors), max(lens), tensors[0].size(-1), dtype=torch.float32)
    for i, (t, n) in enumerate(zip(tensors, lens)):
        out[i, :n] = t[:n].to(torch.float32)
    return out


def _rows(seed, batch, dtype):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(batch):
        tl, nbb = int(rng.integers(3, 27)), int(rng.integers(1, 101))
        feat = torch.from_numpy(rng.standard_normal((nbb, 2048)).astype(np.float16)).to(dtype)
        rows.append({"id": i, "input_ids": rng.integers(0, 30000, tl).tolist(), "img_feat": feat,
                     "img_pos_feat": torch.rand(nbb, 7, generator=torch.Generator().manual_seed(i)),
                     "txt_type_ids": [int(rng.integers(0, 2))] * tl,
                     "target": {"labels": rng.choice(3129, 3, replace=False).tolist(), "scores": [1.0, 0.6, 0.3]}})
    return rows


def _assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


def test_helpers_match_reference_loops():
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = int(rng.integers(1, 41))
        tls, nbbs = rng.integers(1, 30, batch).tolist(), rng.integers(1, 101, batch).tolist()
        max_tl, max_bb = max(tls) + int(rng.integers(0, 3)), max(nbbs) + int(rng.integers(0, 3))
        for new, ref in zip(build_gather_index(tls, nbbs, max_tl, max_bb), ref_gather_index(tls, nbbs, max_tl, max_bb)):
            _assert_same(new, ref)
        seqs = [rng.integers(0, 100, t).tolist() for t in tls]
        _assert_same(pad_ids(seqs, pad=-100), ref_pad_ids(seqs, pad=-100))
        feats = [torch.randn(n + 2, 5).half() for n in nbbs]   # rows beyond the length are cut
        _assert_same(pad_tensors(feats, nbbs), ref_pad_tensors(feats, nbbs))
        exact = [torch.randn(n, 7) for n in nbbs]              # float32 at their length: pad_sequence
        _assert_same(pad_tensors(exact, nbbs), ref_pad_tensors(exact, nbbs))
        _assert_same(pad_tensors(exact), ref_pad_tensors(exact, nbbs))


def test_collate_of_fp16_rows_equals_the_old_fp32_path():
    rows16 = _rows(1, 40, torch.float16)
    rows32 = [dict(r, img_feat=r["img_feat"].float()) for r in rows16]
    new = vqa_collate(rows16, 3129, "vqa2", "train")
    old = vqa_collate(rows32, 3129, "vqa2", "train")
    nbbs = [r["img_feat"].size(0) for r in rows32]
    _assert_same(new["img_feat"], ref_pad_tensors([r["img_feat"] for r in rows32], nbbs))
    _assert_same(new["img_pos_feat"], ref_pad_tensors([r["img_pos_feat"] for r in rows32], nbbs))
    _assert_same(new["input_ids"], ref_pad_ids([r["input_ids"] for r in rows32]))
    _assert_same(new["txt_type_ids"], ref_pad_ids([r["txt_type_ids"] for r in rows32]))
    ref_gather, ref_mask = ref_gather_index([len(r["input_ids"]) for r in rows32], nbbs,
                                            new["input_ids"].size(1), max(nbbs))
    _assert_same(new["gather_index"], ref_gather)
    _assert_same(new["attn_masks"], ref_mask)
    for key, value in old.items():
        if isinstance(value, torch.Tensor):
            _assert_same(new[key], value)
        else:
            assert new[key] == value


def test_img_db_regions_fp16_convert_to_the_fp32_read(tmp_path):
    recs = [(f"img{i}", region_record(12 + 7 * i, np.linspace(0.9, 0.1, 12 + 7 * i), seed=i)) for i in range(4)]
    write_img_db(str(tmp_path), recs)
    db = ImgFeatDB(str(tmp_path))
    rows16, rows32 = [], []
    for i, (key, _) in enumerate(recs):
        feat16, pos16 = db.regions(key)
        feat32, pos32 = db[key]
        assert feat16.dtype == torch.float16 and feat32.dtype == torch.float32
        feat16.mul_(1)  # writable: not a view of the decoded bytes
        _assert_same(feat16.float(), feat32)
        _assert_same(pos16, pos32)
        rows16.append({"id": i, "input_ids": [2, 5, 3], "img_feat": feat16, "img_pos_feat": pos16})
        rows32.append({"id": i, "input_ids": [2, 5, 3], "img_feat": feat32, "img_pos_feat": pos32})
    new, old = collate_rows(rows16), collate_rows(rows32)
    _assert_same(new["img_feat"], old["img_feat"])
    _assert_same(new["img_feat"], ref_pad_tensors([r["img_feat"] for r in rows32], old["num_bbs"]))


def ref_soft_targets(labels_scores, num_answers):
    targets = torch.zeros(len(labels_scores), num_answers, dtype=torch.float32)
    for i, t in enumerate(labels_scores):
        if t and t.get("labels"):
            targets[i, torch.as_tensor(list(t["labels"]), dtype=torch.long)] = torch.as_tensor(
                list(t["scores"]), dtype=torch.float32)
    return targets


def test_soft_targets_match_row_by_row_assignment():
    rng = np.random.default_rng(3)
    batch = [{"labels": rng.choice(50, k, replace=False).tolist(), "scores": rng.uniform(0, 1, k).tolist()}
             for k in rng.integers(0, 6, 30)] + [None, {}]
    _assert_same(soft_targets(batch, 50), ref_soft_targets(batch, 50))
    # a repeated label (the last score wins) and a single score broadcast over a row's labels
    odd = [{"labels": [4, 7, 4], "scores": [0.3, 0.6, 0.9]}, {"labels": [1, 2], "scores": [0.5]}]
    _assert_same(soft_targets(odd, 10), ref_soft_targets(odd, 10))
    assert soft_targets(odd, 10)[0, 4] == pytest.approx(0.9)
