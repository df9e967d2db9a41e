"""Converters: BUTD .npz directory -> img_db, VQA JSON -> txt_db (read back by the vqa2 builder)."""
import json
import os

import numpy as np
import pytest

from datasets_testlib import region_record, vocab_file, write_vqa_json  # noqa: F401 (vocab_file: fixture)
from villa_plugin.common.errors import DataError
from villa_plugin.tasks.vqa.builder import VQA2Builder
from villa_plugin.datasets.convert import build_vqa_txt_db, convert_npz_dir_to_img_db, main
from villa_plugin.datasets.features import ImgFeatDB, nbb_json_name
from villa_plugin.datasets.text import TxtDB

CONFS = [0.9, 0.8, 0.7, 0.5, 0.3, 0.25, 0.1, 0.05, 0.01, 0.01, 0.01, 0.01]


def _npz_dir(tmp_path):
    d = tmp_path / "npz"
    d.mkdir()
    for i in (1, 2):
        np.savez(d / f"coco_train2014_{i:012d}.npz", **{k: v.astype(np.float16) for k, v in region_record(12, CONFS, seed=i, soft_labels=True).items()})
    (d / "broken.npz").write_bytes(b"not a zip")
    return d


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_dir_to_img_db(tmp_path, compressed):
    out = convert_npz_dir_to_img_db(str(_npz_dir(tmp_path)), str(tmp_path / "img_db" / "coco"), conf_th=0.2,
                                    max_bb=100, min_bb=4, compressed=compressed)
    assert out["written"] == 2 and [os.path.basename(p) for p in out["skipped"]] == ["broken.npz"]
    assert json.loads((tmp_path / "img_db" / "coco" / nbb_json_name(0.2, 100, 4)).read_text()) == {
        "coco_train2014_000000000001.npz": 6, "coco_train2014_000000000002.npz": 6}
    db = ImgFeatDB(str(tmp_path / "img_db" / "coco"), min_bb=4, compressed=compressed)
    feat, pos = db["coco_train2014_000000000002.npz"]
    expected = region_record(12, CONFS, seed=2)["features"][:6].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(feat.numpy(), expected)


def test_npz_converter_errors_and_cli(tmp_path, capsys):
    with pytest.raises(DataError, match="Feature directory not found"):
        convert_npz_dir_to_img_db(str(tmp_path / "none"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No .npz files"):
        convert_npz_dir_to_img_db(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert main(["img_db", str(_npz_dir(tmp_path)), str(tmp_path / "cli"), "--conf_th", "-1", "--num_bb", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    assert ImgFeatDB(str(tmp_path / "cli"), conf_th=-1, num_bb=5)["coco_train2014_000000000001.npz"][0].shape == (5, 2048)


def test_vqa_txt_db_round_trip_through_builder(tmp_path, vocab_file):
    convert_npz_dir_to_img_db(str(_npz_dir(tmp_path)), str(tmp_path / "img_db" / "coco"), min_bb=2)
    (tmp_path / "ans2label.json").write_text(json.dumps({"no": 0, "yes": 1, "2": 2}))
    questions = [{"image_id": 1, "question": "is the dog what color?", "question_id": 11},
                 {"image_id": 2, "question": "how many cats?", "question_id": 22}]
    anns = [{"question_id": 11, "question_type": "is the", "answer_type": "yes/no",
             "answers": [{"answer": "yes"}] * 9 + [{"answer": "no"}]},
            {"question_id": 22, "answers": [{"answer": "two"}] * 2 + [{"answer": "3"}] * 8}]
    q, a = write_vqa_json(str(tmp_path), "train", questions, anns, subtype="train2014")
    id2len = build_vqa_txt_db(q, a, str(tmp_path / "ans2label.json"), vocab_file, str(tmp_path / "txt_db" / "t.db"),
                              lowercase=True, tokenizer_name="tiny-uncased")
    txt = TxtDB(str(tmp_path / "txt_db" / "t.db"))
    assert txt.meta["bert"] == "tiny-uncased" and txt.cls_ == 2 and txt.sep == 3
    ex = txt["11"]
    assert ex["img_fname"] == "coco_train2014_000000000001.npz" and len(ex["input_ids"]) == id2len["11"] == 6
    assert ex["target"] == {"labels": [0, 1], "scores": [0.3, 1.0]} and ex["answer_type"] == "yes/no"
    assert txt["22"]["target"] == {"labels": [2], "scores": [0.6]}
    cfg = {"source": "txt_db", "data_dir": str(tmp_path), "ans2label": "ans2label.json", "num_answers": 3,
           "min_bb": 2, "txt_db": {"train": ["txt_db/t.db"]}, "img_db": {"train": ["img_db/coco"]}}
    ds = VQA2Builder("vqa2", cfg).build_dataset("train")
    batch = ds.collate([ds[0], ds[1]])
    assert batch.qids == [11, 22] and batch.targets.tolist() == [[pytest.approx(0.3), 1.0, 0.0], [0.0, 0.0, pytest.approx(0.6)]]
    # the same questions read straight from JSON give the same batch
    js = VQA2Builder("vqa2", dict(cfg, source="vqa_json", vocab=vocab_file, lowercase=True, questions={"train": [q]},
                                  annotations={"train": [a]})).build_dataset("train")
    jbatch = js.collate([js[0], js[1]])
    for key in ("input_ids", "img_feat", "img_pos_feat", "gather_index", "attn_masks", "targets"):
        assert jbatch[key].equal(batch[key]), key


def test_txt_db_converter_errors(tmp_path, vocab_file):
    (tmp_path / "ans2label.json").write_text(json.dumps({"yes": 0}))
    q, _ = write_vqa_json(str(tmp_path), "train", [{"image_id": 1, "question": "what?", "question_id": 1}], None)
    (tmp_path / "empty_ann.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="Question 1 has no annotation"):
        build_vqa_txt_db(q, str(tmp_path / "empty_ann.json"), str(tmp_path / "ans2label.json"), vocab_file, str(tmp_path / "x.db"))
    with pytest.raises(DataError, match="missing_q.json"):
        build_vqa_txt_db(str(tmp_path / "missing_q.json"), None, str(tmp_path / "ans2label.json"), vocab_file, str(tmp_path / "y.db"))


def test_img_db_help_describes_its_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["img_db", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for words in ("npz_dir", "norm_bb [n, 6]", "x1/W, y1/H, x2/W, y2/H, w/W, h/H", "conf [n, 1]",
                  "clamp(#(conf > conf_th), min_bb, max_bb)", "fixed --num_bb", "every box"):
        assert words in text
