"""The `gqa` builder: LXMERT's GQA JSON records, answer vocabulary, gqa_accuracy, the submission JSON."""
import json

import pytest
import torch

from datasets_testlib import region_record, vocab_file  # noqa: F401 (vocab_file: fixture)
from villa_plugin.common.errors import DataError
from villa_plugin.datasets.features import write_img_db
from villa_plugin.registry import registry
from villa_plugin.tasks.gqa.builder import GQABuilder

ANSWERS = ["yes", "no", "2"]


def _config(tmp_path, vocab_file, records_by_split):
    (tmp_path / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    if not (tmp_path / "img_db").exists():
        write_img_db(str(tmp_path / "img_db"), [(str(i), region_record(10, [0.9] * 10, seed=i)) for i in (1, 2)])
    annotations = {}
    for split, records in records_by_split.items():
        (tmp_path / f"{split}.json").write_text(json.dumps(records))
        annotations[split] = [f"{split}.json"]
    return {"source": "lxmert_json", "data_dir": str(tmp_path), "annotations": annotations,
            "img_db": {s: ["img_db"] for s in records_by_split}, "img_key_format": "{img_id}", "vocab": vocab_file,
            "lowercase": True, "ans2label": "ans2label.json", "num_answers": None, "max_txt_len": 18,
            "missing_images": "error", "conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36, "compressed": False}


def _record(qid, img, sent="is there a net", label=None):
    record = {"question_id": qid, "img_id": img, "sent": sent}
    if label is not None:
        record["label"] = label
    return record


def test_builder_reads_lxmert_records_with_targets_and_string_ids(tmp_path, vocab_file):
    cfg = _config(tmp_path, vocab_file, {
        "train": [_record("00000001", "1", label={"yes": 1.0}), _record("00000002", "2", label={"purple": 1.0})],
        "test": [_record("00000003", "2")],
    })
    builder = registry.get_builder_class("gqa")("gqa", cfg)
    assert isinstance(builder, GQABuilder)
    train = builder.build_dataset("train")
    batch = train.collate([train[0], train[1]])
    assert batch["qids"] == ["00000001", "00000002"]  # GQA's ids are strings: leading zeros kept
    assert batch["targets"].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # "purple" is outside the vocabulary
    assert batch["img_feat"].shape[:2] == (2, 10) and batch["img_pos_feat"].size(-1) == 7

    test = builder.build_dataset("test")
    test_batch = test.collate([test[0]])
    assert "targets" not in test_batch
    scores = torch.tensor([[0.1, 0.2, 0.9]])
    predictions = test.format_predictions(test_batch, {"scores": scores})
    assert predictions == [{"questionId": "00000003", "prediction": "2"}]
    path = test.write_predictions(predictions + predictions, str(tmp_path / "submit_predict.json"))
    assert json.load(open(path)) == [{"questionId": "00000003", "prediction": "2"}]  # one per question


def test_bad_records_and_missing_images_name_the_file(tmp_path, vocab_file):
    cfg = _config(tmp_path, vocab_file, {"train": [{"question_id": "1", "sent": "is there a net"}]})
    with pytest.raises(DataError, match=r"train.json, record 0: a GQA record needs \['img_id'\]"):
        registry.get_builder_class("gqa")("gqa", cfg).build_dataset("train")
    cfg = _config(tmp_path, vocab_file, {"train": [_record("7", "99", label={"yes": 1.0})]})
    with pytest.raises(DataError, match=r'train.json, question 7: image "99" is in none of the img_dbs'):
        registry.get_builder_class("gqa")("gqa", cfg).build_dataset("train")


def test_gqa_accuracy_is_exact_match():
    metric = registry.get_metric_class("gqa_accuracy")()
    batch = {"targets": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])}
    metric.update(batch, {"scores": torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])})
    assert metric.compute() == pytest.approx(1 / 3)
