"""``nlvr2`` builder on small files in UNITER's formats (txt_db + img_db), NLVR2's JSON lines and LXMERT's JSON:
paired rows, lengths, labels, the length filter, missing / empty images, predictions CSV."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.tasks.nlvr2.builder import Nlvr2Builder
from villa_plugin.datasets.synthetic import vocab_tokens
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db

ANNOTATIONS = [
    {"identifier": "dev-1-0-0", "sentence": "two dogs are on the left", "label": "True"},
    {"identifier": "dev-1-1-0", "sentence": "two dogs are on the left", "label": "False"},
    {"identifier": "dev-2-0-1", "sentence": "a cat sits", "label": "false"},
    {"identifier": "dev-3-0-0", "sentence": "the cat and the dog are on the left of a tree", "label": "True"},
]
WORDS = "two dogs are on the left a cat sits the and dog of tree".split()
KEY = "nlvr2_{image_id}-img{side}.npz"


def _record(n, seed):
    rng = np.random.default_rng(seed)
    return {"features": rng.random((n, 2048), dtype=np.float32), "norm_bb": rng.random((n, 6), dtype=np.float32),
            "conf": np.ones((n, 1), dtype=np.float32)}


def write_data(root, annotations=ANNOTATIONS, boxes=None, drop_images=(), txt_targets=None):
    """Both formats for ``annotations``; image (i, side) gets ``boxes[(i, side)]`` regions (default 2 + i + side)."""
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(vocab_tokens(WORDS)) + "\n")
    tok = WordPieceTokenizer(str(vocab), lowercase=True)
    (root / "ann").mkdir()
    (root / "ann" / "dev.json").write_text("".join(json.dumps(a) + "\n" for a in annotations))
    (root / "lxmert").mkdir()
    (root / "lxmert" / "valid.json").write_text(json.dumps([lxmert_record(a, n) for n, a in enumerate(annotations)]))
    records, examples = [], []
    for i, ann in enumerate(annotations):
        image_id = ann["identifier"].rsplit("-", 1)[0]
        keys = [KEY.format(image_id=image_id, side=s) for s in (0, 1)]
        for side, key in enumerate(keys):
            if key not in drop_images and all(key != r[0] for r in records):
                records.append((key, _record((boxes or {}).get((i, side), 2 + i + side), seed=10 * i + side)))
        target = (txt_targets or {}).get(i, 1 if ann.get("label", "").lower() == "true" else 0)
        examples.append((ann["identifier"], dict(ann, input_ids=tok.encode(ann["sentence"]), img_fname=keys, target=target)))
    write_img_db(str(root / "img_db" / "nlvr2_dev"), records, conf_th=-1, num_bb=10)
    write_txt_db(str(root / "txt_db" / "nlvr2_dev.db"), examples, tok.meta("test"))
    return tok


def lxmert_record(ann, n):
    """LXMERT's data/nlvr2/valid.json record made from an NLVR2 line, as its process_dataset.py does."""
    image_id = ann["identifier"].rsplit("-", 1)[0]
    record = {"identifier": ann["identifier"], "img0": f"{image_id}-img0", "img1": f"{image_id}-img1",
              "sent": ann["sentence"], "uid": f"nlvr2_valid_{n}"}
    if "label" in ann:
        record["label"] = int(ann["label"].lower() == "true") if ann["label"].lower() in ("true", "false") else ann["label"]
    return record


def builder(root, source="txt_db", split="val", **extra):
    cfg = {
        "source": source, "data_dir": str(root), "vocab": "vocab.txt", "lowercase": True,
        "txt_db": {split: ["txt_db/nlvr2_dev.db"]}, "img_db": {split: ["img_db/nlvr2_dev"]},
        "annotations": {split: ["ann/dev.json"]}, "lxmert_json": {split: ["lxmert/valid.json"]}, "img_key_format": KEY, "use_img_type": True,
        "max_txt_len": 60, "lengths_include_cls_sep": True, "missing_images": "error",
        "conf_th": -1, "max_bb": 100, "min_bb": 1, "num_bb": 10, "compressed": False,
    }
    cfg.update(extra)
    return Nlvr2Builder("nlvr2", cfg)


@pytest.mark.parametrize("source", ["txt_db", "annotations", "lxmert_json"])
def test_every_source_give_paired_rows_lengths_and_labels(tmp_path, source):
    tok = write_data(tmp_path)
    ds = builder(tmp_path, source).build_dataset("val")
    assert ds.identifiers == [a["identifier"] for a in ANNOTATIONS]
    texts = [len(tok.encode(a["sentence"])) for a in ANNOTATIONS]
    assert ds.lengths() == [2 * (t + 2) + (2 + i) + (3 + i) for i, t in enumerate(texts)]
    example = ds[0]
    left, right = example["rows"]
    assert left["input_ids"] == right["input_ids"] == [tok.token_to_id("[CLS]"), *tok.encode(ANNOTATIONS[0]["sentence"]), tok.token_to_id("[SEP]")]
    assert left["img_type_ids"] == [1, 1] and right["img_type_ids"] == [2, 2, 2]
    assert example["target"] == 1 and ds[2]["target"] == 0  # "false" is case-insensitive


def test_collate_orders_rows_left_then_right_and_adds_sentence_ids(tmp_path):
    write_data(tmp_path)
    ds = builder(tmp_path).build_dataset("val")
    batch = ds.collate([ds[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 8 and batch["num_bbs"] == [2, 3, 3, 4, 4, 5, 5, 6]
    assert batch["img_type_ids"][0, :2].tolist() == [1, 1] and batch["img_type_ids"][1, :3].tolist() == [2, 2, 2]
    assert batch["targets"].tolist() == [1, 0, 0, 1] and batch["targets"].dtype == torch.long
    # dev-1-0-0 and dev-1-1-0 are the same sentence (dev-1-0); the others are their own
    assert batch["sentence_index"][0] == batch["sentence_index"][1] and batch["num_sentences"] == 3
    assert batch.get_batch_size() == 4 and batch["identifiers"][3] == "dev-3-0-0"


def test_long_sentences_are_dropped_for_training_and_kept_for_evaluation(tmp_path, caplog):
    write_data(tmp_path)
    caplog.set_level(logging.INFO)
    train = builder(tmp_path, split="train", max_txt_len=8).build_dataset("train")
    assert "dev-3-0-0" not in train.identifiers and len(train) == 3 and train.num_dropped == 1
    assert "1 dropped: text_over_max_txt_len" in caplog.text
    val = builder(tmp_path, max_txt_len=8).build_dataset("val")
    assert len(val) == 4 and "1 longer than max_txt_len=8 kept (evaluation)" in caplog.text


@pytest.mark.parametrize("source", ["txt_db", "annotations", "lxmert_json"])
def test_missing_image_is_an_error_naming_it_or_a_counted_skip(tmp_path, source, caplog):
    write_data(tmp_path, drop_images={"nlvr2_dev-2-0-img1.npz"})
    with pytest.raises(DataError, match=r"dev-2-0-1.*nlvr2_dev-2-0-img1\.npz.*missing_images=skip"):
        builder(tmp_path, source).build_dataset("val")
    caplog.set_level(logging.INFO)
    ds = builder(tmp_path, source, missing_images="skip").build_dataset("val")
    assert len(ds) == 3 and ds.num_dropped == 1 and "1 dropped: missing_image" in caplog.text


def test_image_without_boxes_is_an_error_or_a_counted_skip(tmp_path, caplog):
    write_data(tmp_path, boxes={(1, 0): 0})
    with pytest.raises(DataError, match="zero boxes"):
        builder(tmp_path).build_dataset("val")
    caplog.set_level(logging.INFO)
    ds = builder(tmp_path, missing_images="skip").build_dataset("val")
    assert ds.identifiers == ["dev-1-0-0", "dev-2-0-1", "dev-3-0-0"] and "image_without_boxes" in caplog.text


def test_labels_outside_true_false_are_errors_naming_the_example(tmp_path):
    bad = [dict(ANNOTATIONS[0]), dict(ANNOTATIONS[1], label="maybe")]
    write_data(tmp_path, annotations=bad, txt_targets={0: 2})
    with pytest.raises(DataError, match=r"dev\.json, line 2 \(dev-1-1-0\).*label 'maybe' is outside the head's range"):
        builder(tmp_path, "annotations").build_dataset("val")
    ds = builder(tmp_path, "txt_db").build_dataset("val")
    with pytest.raises(DataError, match=r"example \"dev-1-0-0\".*label 2 is outside"):
        ds[0]


def test_unlabelled_annotations_give_batches_without_targets(tmp_path):
    unlabelled = [{k: v for k, v in a.items() if k != "label"} for a in ANNOTATIONS]
    write_data(tmp_path, annotations=unlabelled)
    ds = builder(tmp_path, "annotations", split="test", txt_db={}, img_db={"test": ["img_db/nlvr2_dev"]},
                 annotations={"test": ["ann/dev.json"]}).build_dataset("test")
    batch = ds.collate([ds[0], ds[1]])
    assert "targets" not in batch and batch["input_ids"].shape[0] == 4


def test_predictions_are_the_official_csv(tmp_path):
    write_data(tmp_path)
    ds = builder(tmp_path).build_dataset("val")
    batch = ds.collate([ds[i] for i in range(4)])
    records = ds.format_predictions(batch, {"scores": torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])})
    path = ds.write_predictions(records + records[:1], str(tmp_path / "out" / "nlvr2_val.json"))
    assert path.endswith("nlvr2_val.csv")
    assert open(path).read().splitlines() == ["dev-1-0-0,True", "dev-1-1-0,False", "dev-2-0-1,True", "dev-3-0-0,False"]


def test_lxmert_records_errors_name_the_file_and_record_and_img_id_names_images(tmp_path):
    write_data(tmp_path)
    ds = builder(tmp_path, "lxmert_json", img_key_format="nlvr2_{img_id}.npz").build_dataset("val")
    assert ds.identifiers == [a["identifier"] for a in ANNOTATIONS]  # the same keys as the default format
    records = json.loads((tmp_path / "lxmert" / "valid.json").read_text())
    (tmp_path / "lxmert" / "valid.json").write_text(json.dumps(records[:1] + [dict(records[1], label=2)]))
    with pytest.raises(DataError, match=r"valid\.json, record 1 \(dev-1-1-0\): label 2 is outside the head's range"):
        builder(tmp_path, "lxmert_json").build_dataset("val")
    del records[2]["img1"]
    (tmp_path / "lxmert" / "valid.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"valid\.json, record 2: a NLVR2 record needs \['img1'\]"):
        builder(tmp_path, "lxmert_json").build_dataset("val")


def test_majority_baseline_is_the_share_of_the_most_frequent_training_label(tmp_path):
    write_data(tmp_path)  # labels True, False, False, True
    val = builder(tmp_path, "annotations").build_dataset("val")
    assert val.baselines() == {"majority_baseline": 0.5}  # a tie: False
    train = builder(tmp_path, "lxmert_json", split="train", max_txt_len=8).build_dataset("train")  # True, False, False
    assert val.baselines(train) == {"majority_baseline": 0.5}
    true_heavy = [dict(a, label="True") for a in ANNOTATIONS[:3]]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_text("".join(json.dumps(a) + "\n" for a in true_heavy))
    train = builder(tmp_path, "annotations", split="train", annotations={"train": ["t/train.json"]}).build_dataset("train")
    partial = builder(tmp_path, "annotations").build_dataset("val")
    partial._targets = [1, 1, 1, 0]
    assert partial.baselines(train) == {"majority_baseline": 0.75}  # always True
    assert builder(tmp_path, "txt_db").build_dataset("val").baselines(train) == {}  # labels not in memory
