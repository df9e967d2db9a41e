"""``visual_entailment`` builder on small files in UNITER's formats and in SNLI-VE's JSON lines:
one-hot targets, label checks, the length filter, missing images, the predictions JSON."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.tasks.visual_entailment.builder import VEBuilder
from villa_plugin.datasets.synthetic import vocab_tokens
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db

ANNOTATIONS = [
    {"Flikr30kID": "1001.jpg", "sentence2": "a dog runs", "gold_label": "entailment", "pairID": "1001.jpg#0r1e"},
    {"Flikr30kID": "1001.jpg", "sentence2": "a cat sleeps", "gold_label": "contradiction", "pairID": "1001.jpg#0r1c"},
    {"Flikr30kID": "1002.jpg", "sentence2": "the dog is old and the cat is very happy", "gold_label": "neutral",
     "pairID": "1002.jpg#0r1n"},
]
WORDS = "a dog runs cat sleeps the is old and very happy".split()


def write_data(root, annotations=ANNOTATIONS, txt_target=lambda ann: {"labels": [["contradiction", "entailment", "neutral"].index(ann["gold_label"])], "scores": [1.0]}, skip_images=()):
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(vocab_tokens(WORDS)) + "\n")
    tok = WordPieceTokenizer(str(vocab), lowercase=True)
    (root / "snli_ve_dev.jsonl").write_text("".join(json.dumps(a) + "\n" for a in annotations))
    rng = np.random.default_rng(0)
    images = sorted({f"flickr30k_{int(a['Flikr30kID'].split('.')[0]):012d}.npz" for a in annotations} - set(skip_images))
    write_img_db(str(root / "img_db" / "flickr30k"), [(k, {"features": rng.random((3, 2048), dtype=np.float32),
                 "norm_bb": rng.random((3, 6), dtype=np.float32), "conf": np.ones((3, 1), np.float32)}) for k in images],
                 conf_th=-1, num_bb=10)
    examples = [(a["pairID"], dict(a, input_ids=tok.encode(a["sentence2"]), target=txt_target(a),
                 img_fname=f"flickr30k_{int(a['Flikr30kID'].split('.')[0]):012d}.npz")) for a in annotations]
    write_txt_db(str(root / "txt_db" / "ve_dev.db"), examples, tok.meta("test"))
    return tok


def builder(root, source="txt_db", split="val", **extra):
    cfg = {"source": source, "data_dir": str(root), "vocab": "vocab.txt", "lowercase": True,
           "txt_db": {split: ["txt_db/ve_dev.db"]}, "img_db": {split: ["img_db/flickr30k"]},
           "annotations": {split: ["snli_ve_dev.jsonl"]}, "img_key_format": "flickr30k_{image_id:012d}.npz",
           "max_txt_len": 60, "missing_images": "error", "conf_th": -1, "num_bb": 10, "min_bb": 1, "max_bb": 100}
    cfg.update(extra)
    return VEBuilder("visual_entailment", cfg)


@pytest.mark.parametrize("source", ["txt_db", "annotations"])
def test_both_sources_give_one_hot_targets_in_uniter_label_order(tmp_path, source):
    tok = write_data(tmp_path)
    ds = builder(tmp_path, source).build_dataset("val")
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch["targets"].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]  # 0 contradiction, 1 entailment, 2 neutral
    assert batch["qids"] == [a["pairID"] for a in ANNOTATIONS]
    assert ds[0]["input_ids"] == [tok.token_to_id("[CLS]"), *tok.encode("a dog runs"), tok.token_to_id("[SEP]")]
    assert ds.lengths()[0] == 3 + 2 + 3


def test_txt_db_with_bare_label_ids(tmp_path):
    write_data(tmp_path, txt_target=lambda a: ["contradiction", "entailment", "neutral"].index(a["gold_label"]))
    ds = builder(tmp_path).build_dataset("val")
    assert ds.collate([ds[2]])["targets"].tolist() == [[0, 0, 1]]


def test_bad_labels_are_errors_naming_file_and_example(tmp_path):
    write_data(tmp_path, annotations=[ANNOTATIONS[0], dict(ANNOTATIONS[1], gold_label="-")], txt_target=lambda a: 5)
    with pytest.raises(DataError, match=r"snli_ve_dev\.jsonl, line 2 \(1001\.jpg#0r1c\).*gold_label '-' is outside"):
        builder(tmp_path, "annotations").build_dataset("val")
    ds = builder(tmp_path).build_dataset("val")
    with pytest.raises(DataError, match=r"ve_dev\.db.*1001\.jpg#0r1e.*label 5 is outside the head's range \[0, 3\)"):
        ds[0]


def test_length_filter_and_missing_images(tmp_path, caplog):
    write_data(tmp_path, skip_images={"flickr30k_000000001002.npz"})
    with pytest.raises(DataError, match=r"1002\.jpg#0r1n.*flickr30k_000000001002\.npz"):
        builder(tmp_path, "annotations").build_dataset("val")
    caplog.set_level(logging.INFO)
    ds = builder(tmp_path, "annotations", split="train", max_txt_len=3, missing_images="skip").build_dataset("train")
    assert len(ds) == 2 and ds.num_dropped == 1
    assert "1 dropped: text_over_max_txt_len" in caplog.text  # the long hypothesis is also the one without image


def test_predictions_json_has_pair_id_and_label(tmp_path):
    write_data(tmp_path)
    ds = builder(tmp_path).build_dataset("val")
    batch = ds.collate([ds[i] for i in range(3)])
    records = ds.format_predictions(batch, {"scores": torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])})
    path = ds.write_predictions(records, str(tmp_path / "ve_val.json"))
    assert json.loads(open(path).read()) == [
        {"pair_id": "1001.jpg#0r1e", "label": "entailment"},
        {"pair_id": "1001.jpg#0r1c", "label": "contradiction"},
        {"pair_id": "1002.jpg#0r1n", "label": "neutral"},
    ]
