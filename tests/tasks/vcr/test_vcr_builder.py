"""``vcr`` builder on small files in UNITER's formats (txt_db + gt/detected img_dbs) and in VCR's JSON
lines: tags, row layouts and type ids, region order, lengths, labels, bad input, the leaderboard CSV."""
from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.tasks.vcr.builder import VcrBuilder
from villa_plugin.tasks.vcr.dataset import CSV_HEADER
from villa_plugin.datasets.synthetic import vocab_tokens
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db

WORDS = "what is doing he she runs sits because tired happy yes no cat".split()
TAG_BASE = 500


def annotation(n, split="val", labelled=True, tag=0):
    ann = {
        "annot_id": f"{split}-{n}", "img_id": f"{split}-{n}", "movie": "m", "img_fn": f"m/clip_{n}.jpg",
        "objects": ["person", "person", "cat"],
        "question": ["what", "is", [tag], "doing", "?"],
        "answer_choices": [["he", "runs"], ["she", "sits"], [[0, 1], "runs"], ["yes"]],
        "rationale_choices": [["because", "tired"], ["because", [2], "happy"], ["no"], ["cat"]],
    }
    if labelled:
        ann.update(answer_label=(n + 1) % 4, rationale_label=n % 4)
    return ann


def _record(n, seed):
    rng = np.random.default_rng(seed)
    return {"features": rng.random((n, 2048), dtype=np.float32), "norm_bb": rng.random((n, 6), dtype=np.float32),
            "conf": np.ones((n, 1), dtype=np.float32)}


def write_data(root, anns, split="val", skip_det=()):
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(vocab_tokens(WORDS)) + "\n")
    tok = WordPieceTokenizer(str(vocab), lowercase=True)
    (root / f"{split}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in anns))
    key = lambda prefix, a: f"{prefix}_{split}_{a['img_fn'][:-4].replace('/', '_')}.npz"  # noqa: E731
    write_img_db(str(root / "img_db" / f"vcr_gt_{split}"), [(key("vcr_gt", a), _record(3, i)) for i, a in enumerate(anns)],
                 conf_th=-1, num_bb=100)
    write_img_db(str(root / "img_db" / f"vcr_{split}"),
                 [(key("vcr", a), _record(4, 100 + i)) for i, a in enumerate(anns) if a["annot_id"] not in skip_det],
                 conf_th=-1, num_bb=100)

    def ids(tokens):
        out = []
        for t in tokens:
            out.extend([TAG_BASE + i for i in t] if isinstance(t, list) else tok.encode(t))
        return out

    records, id2len_qar = [], {}
    for a in anns:
        q, answers, rationales = ids(a["question"]), [ids(x) for x in a["answer_choices"]], [ids(x) for x in a["rationale_choices"]]
        qa_t = a.get("answer_label", -1)
        id2len_qar[a["annot_id"]] = len(q) + len(answers[qa_t if 0 <= qa_t < 4 else 0]) + max(len(r) for r in rationales)
        records.append((a["annot_id"], {"input_ids": q, "input_ids_as": answers, "input_ids_rs": rationales,
                                        "qa_target": qa_t, "qar_target": a.get("rationale_label", -1),
                                        "img_fname": [key("vcr_gt", a), key("vcr", a)]}))
    db_dir = root / "txt_db" / f"vcr_{split}.db"
    write_txt_db(str(db_dir), records, tok.meta("test"))
    (db_dir / "id2len_qar.json").write_text(json.dumps(id2len_qar))
    return tok


def builder(root, source="txt_db", split="val", **extra):
    cfg = {"source": source, "data_dir": str(root), "vocab": "vocab.txt", "lowercase": True, "tag_token_base": TAG_BASE,
           "txt_db": {split: [f"txt_db/vcr_{split}.db"]}, "annotations": {split: [f"{split}.jsonl"]},
           "img_db_gt": {split: [f"img_db/vcr_gt_{split}"]}, "img_db": {split: [f"img_db/vcr_{split}"]},
           "gt_img_key_format": "vcr_gt_{split}_{img_fn}.npz", "img_key_format": "vcr_{split}_{img_fn}.npz",
           "train_tasks": ["qa", "qar"], "qar_candidates": "auto", "max_txt_len": 220, "missing_images": "error",
           "conf_th": -1, "num_bb": 100, "min_bb": 1, "max_bb": 100, "gt_conf_th": -1, "gt_num_bb": 100}
    cfg.update(extra)
    return VcrBuilder("vcr", cfg)


@pytest.mark.parametrize("source", ["txt_db", "annotations"])
def test_rows_types_and_regions(tmp_path, source):
    tok = write_data(tmp_path, [annotation(0), annotation(1)])
    ds = builder(tmp_path, source).build_dataset("val")
    cls_, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    q = tok.encode("what is") + [TAG_BASE + 0] + tok.encode("doing ?")
    example = ds[0]  # answer label 1, rationale label 0
    rows = example["rows"]
    assert len(rows) == 8
    a2 = [TAG_BASE + 0, TAG_BASE + 1] + tok.encode("runs")  # tag [0, 1] -> two tag tokens
    assert rows[2]["input_ids"] == [cls_, *q, sep, *a2, sep]
    assert rows[2]["txt_type_ids"] == [0] + [0] * len(q) + [2] + [2] * len(a2) + [2]
    gt_answer, r1 = tok.encode("she sits"), tok.encode("because") + [TAG_BASE + 2] + tok.encode("happy")
    assert rows[5]["input_ids"] == [cls_, *q, sep, *gt_answer, sep, *r1, sep]
    assert rows[5]["txt_type_ids"] == [0] * (1 + len(q)) + [2] * (1 + len(gt_answer)) + [3] * (1 + len(r1) + 1)
    assert example["row_targets"] == [0, 1, 0, 0, 1, 0, 0, 0]
    assert rows[0]["img_feat"].shape == (7, 2048)  # 3 gt boxes first, then 4 detected boxes
    gt_first = ds.img_dbs_gt[0][ds.img_keys[0][0]][0]
    assert torch.equal(rows[0]["img_feat"][:3], gt_first)
    qar_text = len(q) + len(gt_answer) + len(r1)
    assert ds.lengths()[0] == qar_text + 3 + 4


def test_collate_train_val_and_test_layouts(tmp_path):
    write_data(tmp_path, [annotation(0), annotation(1)])
    val = builder(tmp_path).build_dataset("val")
    batch = val.collate([val[0], val[1]])
    assert batch["input_ids"].shape[0] == 16 and batch["rows_per_example"] == [8, 8]
    assert batch["qa_targets"].tolist() == [1, 2] and batch["qar_targets"].tolist() == [0, 1]
    assert batch["targets"].tolist() == [0, 1, 0, 0, 1, 0, 0, 0] + [0, 0, 1, 0, 0, 1, 0, 0]
    everything = builder(tmp_path, qar_candidates="all").build_dataset("val")
    assert everything[0]["rows"].__len__() == 20 and everything.rows_per_question == 20
    qa_only = builder(tmp_path, split="train", train_tasks=["qa"], txt_db={"train": ["txt_db/vcr_val.db"]},
                      img_db_gt={"train": ["img_db/vcr_gt_val"]}, img_db={"train": ["img_db/vcr_val"]}).build_dataset("train")
    assert len(qa_only[0]["rows"]) == 4


def test_unlabelled_test_split_has_twenty_rows_and_writes_the_leaderboard_csv(tmp_path):
    write_data(tmp_path, [annotation(10, "test", labelled=False), annotation(2, "test", labelled=False)], split="test")
    ds = builder(tmp_path, split="test").build_dataset("test")
    batch = ds.collate([ds[0], ds[1]])
    assert "targets" not in batch and "qa_targets" not in batch and batch["input_ids"].shape[0] == 40
    scores = torch.randn(40, 2)
    records = ds.format_predictions(batch, {"scores": scores})
    path = ds.write_predictions(records, str(tmp_path / "vcr_test.json"))
    assert path.endswith(".csv")
    rows = list(csv.reader(open(path)))
    assert rows[0] == CSV_HEADER and len(CSV_HEADER) == 21
    assert [r[0] for r in rows[1:]] == ["test-2", "test-10"]  # annot_id order
    second = [float(x) for x in rows[1][1:]]  # test-2 is the batch's second question
    expected = torch.softmax(scores[20:24, 1], 0).tolist()
    assert second[:4] == pytest.approx(expected, abs=1e-6)
    for group in range(5):
        assert sum(second[4 * group: 4 * group + 4]) == pytest.approx(1.0, abs=1e-6)
    assert second[4 + 4 * 2: 8 + 4 * 2] == pytest.approx(torch.softmax(scores[20 + 12: 20 + 16, 1], 0).tolist(), abs=1e-6)


def test_gt_layout_cannot_write_leaderboard_predictions(tmp_path):
    write_data(tmp_path, [annotation(0)])
    ds = builder(tmp_path).build_dataset("val")
    with pytest.raises(ConfigError, match="qar_candidates=all"):
        ds.format_predictions(ds.collate([ds[0]]), {"scores": torch.randn(8, 2)})


def test_bad_labels_missing_images_and_long_texts(tmp_path, caplog):
    anns = [annotation(0), annotation(1), dict(annotation(2), answer_label=7)]
    write_data(tmp_path, anns, skip_det={"val-1"})
    with pytest.raises(DataError, match=r"val\.jsonl, line 3 \(val-2\) \(answer\): label 7 is outside the head's range"):
        builder(tmp_path, "annotations", missing_images="skip").build_dataset("val")
    with pytest.raises(DataError, match=r"val-1.*vcr_val_m_clip_1\.npz.*missing_images=skip"):
        builder(tmp_path, "txt_db").build_dataset("val")
    caplog.set_level(logging.INFO)
    ds = builder(tmp_path, "txt_db", missing_images="skip").build_dataset("val")
    assert ds.annot_ids == ["val-0", "val-2"] and "1 dropped: missing_image" in caplog.text
    with pytest.raises(DataError, match=r"val-2.*label 7"):
        ds[1]
    # val-1's QA->R text (question 5 + answer "[0][1] runs" 3 + longest rationale 3 = 11) is over 10
    train = builder(tmp_path, "txt_db", split="train", max_txt_len=10, txt_db={"train": ["txt_db/vcr_val.db"]},
                    img_db_gt={"train": ["img_db/vcr_gt_val"]}, img_db={"train": ["img_db/vcr_val"]}).build_dataset("train")
    assert train.annot_ids == ["val-0", "val-2"] and "1 dropped: text_over_max_txt_len" in caplog.text


def test_tags_beyond_the_81_tokens_fall_back_to_class_names(tmp_path, caplog):
    ann = annotation(0)
    ann["objects"] = ["person"] * 90
    ann["question"] = ["what", "is", [85], "doing", "?"]
    tok = write_data(tmp_path, [ann])
    caplog.set_level(logging.INFO)
    ds = builder(tmp_path, "annotations").build_dataset("val")
    expected = tok.encode("what is person doing ?")
    assert ds[0]["rows"][0]["input_ids"][1:1 + len(expected)] == expected
    assert "1 tags referred to objects beyond the 81 tag tokens" in caplog.text
    ann["question"] = ["what", "is", [95], "?"]
    (tmp_path / "val.jsonl").write_text(json.dumps(ann) + "\n")
    with pytest.raises(DataError, match=r"tag \[95\] refers to object 95, but the example lists 90 objects"):
        builder(tmp_path, "annotations").build_dataset("val")
