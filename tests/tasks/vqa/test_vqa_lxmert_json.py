"""The `vqa2` builder's source `lxmert_json`: LXMERT's data/vqa/*.json records (train + nominival / minival)."""
import json

import pytest

from datasets_testlib import region_record, vocab_file  # noqa: F401 (vocab_file: fixture)
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import WordPieceTokenizer
from villa_plugin.tasks.vqa.builder import VQA2Builder

# LXMERT's trainval_ans2label.json: a dict, "" is label 0
ANS2LABEL = {"": 0, "yes": 1, "no": 2, "2": 3}
IMG = ["COCO_train2014_000000000009", "COCO_val2014_000000000042"]


def _record(qid, img, sent, label=None):
    record = {"question_id": qid, "img_id": img, "sent": sent, "answer_type": "other", "question_type": "what"}
    if label is not None:
        record["label"] = label
    return record


def _config(tmp_path, vocab_file, files):
    (tmp_path / "vqa").mkdir(exist_ok=True)
    (tmp_path / "vqa" / "trainval_ans2label.json").write_text(json.dumps(ANS2LABEL))
    if not (tmp_path / "img_db").exists():
        write_img_db(str(tmp_path / "img_db"), [(k, region_record(36, [0.9] * 36, seed=i)) for i, k in enumerate(IMG)])
    for name, records in files.items():
        (tmp_path / "vqa" / f"{name}.json").write_text(json.dumps(records))
    return {"source": "lxmert_json", "data_dir": str(tmp_path), "vocab": vocab_file, "lowercase": True,
            "lxmert_json": {"train": ["vqa/train.json", "vqa/nominival.json"], "val": ["vqa/minival.json"],
                            "test": ["vqa/test.json"]},
            "img_db": {s: ["img_db"] for s in ("train", "val", "test")}, "img_key_format": "{img_id}",
            "ans2label": "vqa/trainval_ans2label.json", "num_answers": None, "max_txt_len": 18,
            "conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36, "compressed": False}


def _files():
    return {
        "train": [_record(9001, IMG[0], "Is there a dog?", {"yes": 1, "no": 0.3}),
                  _record(9002, IMG[0], "How many dogs?", {"2": 0.9, "purple": 1})],
        "nominival": [_record(42001, IMG[1], "is the cat there", {"no": 0.6})],
        "minival": [_record(42002, IMG[1], "what is it", {"yes": 1})],
        "test": [_record(42003, IMG[1], "is it a dog")],
    }


def test_train_is_train_plus_nominival_with_the_file_scores(tmp_path, vocab_file):
    cfg = _config(tmp_path, vocab_file, _files())
    train = VQA2Builder("vqa2", cfg).build_dataset("train")
    assert train.qids == [9001, 9002, 42001]  # int ids, both files in order
    assert train.img_keys == [IMG[0], IMG[0], IMG[1]]
    tok = WordPieceTokenizer(vocab_file, lowercase=True)
    assert train[0]["input_ids"] == [2] + tok.encode("is there a dog?") + [3]
    batch = train.collate([train[i] for i in range(3)])
    # the scores as given; "purple" is outside the vocabulary and dropped
    assert batch.targets.tolist() == [[0, 1.0, pytest.approx(0.3), 0], [0, 0, 0, pytest.approx(0.9)],
                                      [0, 0, pytest.approx(0.6), 0]]
    val = VQA2Builder("vqa2", cfg).build_dataset("val")
    assert val.qids == [42002] and val.collate([val[0]]).targets.tolist() == [[0, 1.0, 0, 0]]
    test = VQA2Builder("vqa2", cfg).build_dataset("test")
    assert "targets" not in test.collate([test[0]])


def test_bad_records_name_the_file_and_record(tmp_path, vocab_file):
    files = _files()
    files["nominival"] = [files["nominival"][0], {"question_id": 5, "sent": "no image"}]
    with pytest.raises(DataError, match=r"nominival.json, record 1: a VQA2 record needs \['img_id'\]"):
        VQA2Builder("vqa2", _config(tmp_path, vocab_file, files)).build_dataset("train")
    files = _files()
    files["train"][1]["label"] = ["2"]
    with pytest.raises(DataError, match=r"train.json, record 1 \(question 9002\): label must be \{answer: score\}"):
        VQA2Builder("vqa2", _config(tmp_path, vocab_file, files)).build_dataset("train")
    (tmp_path / "vqa" / "minival.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(DataError, match=r"minival.json: expected a JSON list of LXMERT VQA2 records"):
        VQA2Builder("vqa2", _config(tmp_path, vocab_file, {})).build_dataset("val")
    cfg = _config(tmp_path, vocab_file, _files())
    with pytest.raises(ConfigError, match=r"img_key_format .*\{img_id\}"):
        VQA2Builder("vqa2", dict(cfg, img_key_format="coco_{subtype}_{image_id:012d}.npz")).build_dataset("train")
    with pytest.raises(DataError, match=r"train.json, question 9001: image \"x_COCO"):
        VQA2Builder("vqa2", dict(cfg, img_key_format="x_{img_id}")).build_dataset("train")


def test_majority_baseline_is_the_score_of_the_most_frequent_training_answer(tmp_path, vocab_file):
    files = _files()
    files["minival"] = [_record(1, IMG[1], "what", {"yes": 1}), _record(2, IMG[1], "what", {"no": 1, "yes": 0.3}),
                        _record(3, IMG[1], "what", {"2": 1}), _record(4, IMG[1], "what", {"no": 0.6})]
    cfg = _config(tmp_path, vocab_file, files)
    train = VQA2Builder("vqa2", cfg).build_dataset("train")  # total scores: yes 1.0, no 0.9, 2 0.9
    val = VQA2Builder("vqa2", cfg).build_dataset("val")
    assert val.baselines(train) == {"majority_baseline": pytest.approx((1 + 0.3 + 0 + 0) / 4)}
    assert val.baselines() == {"majority_baseline": pytest.approx((0 + 1 + 0 + 0.6) / 4)}  # its own: "no" 1.6
    test = VQA2Builder("vqa2", cfg).build_dataset("test")
    assert test.baselines(train) == {}  # no targets, no baseline


def test_trainer_reports_dataset_baselines_per_split():
    from villa_plugin.trainers.base_trainer import dataset_baselines

    class WithBaseline:
        def baselines(self, train):
            return {"majority_baseline": 0.25 if train is not None else 0.5}

    datasets = {"train": {"a": object()}, "val": {"a": WithBaseline(), "b": object()}, "test": {"a": WithBaseline()}}
    assert dataset_baselines(datasets) == {"val": {"val/a/majority_baseline": 0.25},
                                           "test": {"test/a/majority_baseline": 0.25}}
    assert dataset_baselines({"val": {"a": WithBaseline()}}) == {"val": {"val/a/majority_baseline": 0.5}}
