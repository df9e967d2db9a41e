"""Builder ``refcoco`` on small files in UNITER's RE txt_db format and in the refer toolkit's format
(JSON): splits, targets (ann_ids order, IoU matching, explicit), gt / detected boxes, bad input,
the pickle refusal and the predictions file."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datasets_testlib import BASE_TOKENS
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.registry import registry
from villa_plugin.tasks.refcoco.builder import RefcocoBuilder
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import write_txt_db

META = {"toker": "test", "CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "v_range": [5, len(BASE_TOKENS)]}
GT = {"conf_th": -1, "max_bb": 100, "min_bb": 10, "num_bb": 100, "compressed": False}
GT_KEY = "visual_grounding_coco_gt_{image_id:012d}.npz"
DET_KEY = "visual_grounding_det_coco_{image_id:012d}.npz"
W, H = 200.0, 100.0
# image 1: three objects side by side; image 2: two objects
IMAGES = {1: {1: [0, 0, 50, 50], 2: [60, 0, 50, 50], 3: [120, 10, 60, 80]}, 2: {4: [10, 10, 80, 80], 5: [100, 10, 80, 80]}}
REFS = [  # (ref_id, ann_id, image_id, split, sentences)
    (10, 2, 1, "train", [(100, "the dog"), (101, "what color is the dog the dog the dog")]),
    (11, 5, 2, "train", [(102, "the cat")]),
    (12, 3, 1, "val", [(103, "the umbrella"), (104, "the umbrella is there yes the umbrella")]),
    (13, 4, 2, "testA", [(105, "the dog")]),
    (14, 1, 1, "testB", [(106, "the cat")]),
]


def norm(box):
    x, y, w, h = box
    return [x / W, y / H, (x + w) / W, (y + h) / H, w / W, h / H]


def record(boxes, seed=0):
    rng = np.random.default_rng(seed)
    n = len(boxes)
    return {"features": rng.uniform(0, 2, (n, 2048)).astype(np.float32),
            "norm_bb": np.asarray([norm(b) for b in boxes], np.float32).reshape(n, 6),
            "conf": np.full((n, 1), 0.9, np.float32)}


def write_stores(root, gt_images=None, det_shift=3.0):
    gt_images = IMAGES if gt_images is None else gt_images
    write_img_db(str(root / "img_db" / "re_coco_gt"),
                 [(GT_KEY.format(image_id=i), record(list(anns.values()), i)) for i, anns in gt_images.items()], **GT)
    det = []
    for i, anns in IMAGES.items():  # detected: shifted boxes in reverse order, plus a far-away box
        boxes = [[b[0] + det_shift, b[1], b[2], b[3]] for b in reversed(list(anns.values()))] + [[190, 90, 9, 9]]
        det.append((DET_KEY.format(image_id=i), record(boxes, 10 + i)))
    write_img_db(str(root / "img_db" / "re_coco_det"), det, **GT)


def tokens(text):
    return [BASE_TOKENS.index(w) for w in text.split()]


def write_re_txt_dbs(root, explicit_target=None, side_files=True, refs=REFS):
    anns = [{"id": a, "image_id": i, "bbox": b, "category_id": 1} for i, boxes in IMAGES.items() for a, b in boxes.items()]
    images = [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W, "ann_ids": list(boxes)} for i, boxes in IMAGES.items()]
    for split in ("train", "val", "testA", "testB"):
        split_refs = [r for r in refs if r[3] == split]
        examples = []
        for ref_id, ann_id, image_id, _, sents in split_refs:
            for sent_id, text in sents:
                ex = {"sent_id": sent_id, "sent": text, "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
                      "bbox": {a: b for boxes in IMAGES.values() for a, b in boxes.items()}[ann_id], "input_ids": tokens(text), "img_fname": GT_KEY.format(image_id=image_id)}
                if explicit_target is not None:
                    ex["target"] = explicit_target
                examples.append((str(sent_id), ex))
        db = root / "txt_db" / f"refcoco_{split}.db"
        write_txt_db(str(db), examples, META)
        if side_files:
            (db / "refs.json").write_text(json.dumps([{"ref_id": r, "ann_id": a, "image_id": i, "split": s,
                                                       "sent_ids": [x for x, _ in sents]} for r, a, i, s, sents in split_refs]))
            (db / "annotations.json").write_text(json.dumps(anns))
            (db / "images.json").write_text(json.dumps(images))


def write_refer(root, refs=REFS):
    os.makedirs(root / "refer", exist_ok=True)
    data = [{"ref_id": r, "ann_id": a, "image_id": i, "split": s, "sent_ids": [x for x, _ in sents],
             "sentences": [{"sent_id": x, "sent": t, "raw": t, "tokens": t.split()} for x, t in sents]}
            for r, a, i, s, sents in refs]
    (root / "refer" / "refs(unc).json").write_text(json.dumps(data))
    instances = {"images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.jpg"} for i in IMAGES],
                 "annotations": [{"id": a, "image_id": i, "bbox": b} for i, boxes in IMAGES.items() for a, b in boxes.items()]}
    (root / "refer" / "instances.json").write_text(json.dumps(instances))
    (root / "vocab.txt").write_text("\n".join(BASE_TOKENS) + "\n")


def config(root, **overrides):
    cfg = {
        "variant": "refcoco", "source": "txt_db", "data_dir": str(root),
        "refcoco": {"txt_db": {s: f"txt_db/refcoco_{s}.db" for s in ("train", "val", "testA", "testB")},
                    "refs_json": "refer/refs(unc).json", "instances_json": "refer/instances.json"},
        "img_db": {"gt": "img_db/re_coco_gt", "det": "img_db/re_coco_det"},
        "img_key_format": {"gt": GT_KEY, "det": DET_KEY}, "vocab": "vocab.txt", "lowercase": False,
        "train_boxes": "gt", "boxes": "gt", "max_txt_len": 6, "target_min_iou": 0.5, **GT,
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def files(tmp_path):
    write_stores(tmp_path)
    write_re_txt_dbs(tmp_path)
    write_refer(tmp_path)
    return tmp_path


def test_yaml_defaults():
    conf = OmegaConf.load(RefcocoBuilder.config_path())["dataset_config"]["refcoco"]
    assert conf.conf_th == -1 and conf.num_bb == 100 and conf.boxes == "gt" and conf.train_boxes == "gt"
    assert conf.img_key_format.gt.format(image_id=9) == "visual_grounding_coco_gt_000000000009.npz"
    assert set(conf.refcocog.txt_db) == {"train", "val", "test"}


def test_uniter_txt_db_train_with_gt_boxes_uses_the_ann_ids_order(files):
    train = RefcocoBuilder("refcoco", config(files)).build_dataset("train")
    assert train.sent_ids == [100, 102] and train.num_dropped == 1  # sentence 101 is 9 tokens > 6
    first = train[0]
    assert first["target"] == 1 and first["input_ids"] == [2, *tokens("the dog"), 3]  # ann 2 is 2nd of image 1
    assert train[1]["target"] == 1  # ann 5 is 2nd of image 2
    batch = train.collate([train[0], train[1]])
    assert batch["targets"].tolist() == [1, 1] and batch["img_feat"].shape == (2, 3, 2048)
    assert batch["gt_boxes"].tolist() == [[60, 0, 50, 50], [100, 10, 80, 80]]
    assert batch["image_sizes"].tolist() == [[W, H], [W, H]] and batch["sent_ids"] == [100, 102]
    assert train.lengths() == [2 + 2 + 3, 2 + 2 + 2]  # tokens + [CLS]/[SEP] + regions


def test_val_and_test_splits_map_onto_the_variant_splits(files):
    builder = RefcocoBuilder("refcoco", config(files))
    val = builder.build_dataset("val")
    assert val.sent_ids == [103, 104] and val.source_split == "val" and val.num_dropped == 0  # long kept in eval
    assert RefcocoBuilder("refcoco", config(files)).build_dataset("test").sent_ids == [105]  # testA
    assert RefcocoBuilder("refcoco", config(files, test_split="testB")).build_dataset("test").sent_ids == [106]
    with pytest.raises(ConfigError, match="testC"):
        RefcocoBuilder("refcoco", config(files, test_split="testC")).build_dataset("test")
    with pytest.raises(ConfigError, match="variant"):
        RefcocoBuilder("refcoco", config(files, variant="refclef")).build_dataset("val")


def test_refcocog_has_val_and_test(files):
    cfg = config(files, variant="refcocog")
    cfg["refcocog"] = {"txt_db": {"train": "txt_db/refcoco_train.db", "val": "txt_db/refcoco_val.db", "test": "txt_db/refcoco_testA.db"}}
    assert RefcocoBuilder("refcoco", cfg).build_dataset("test").source_split == "test"
    with pytest.raises(ConfigError, match=r"refcocog has splits \['train', 'val', 'test'\]"):
        RefcocoBuilder("refcoco", dict(cfg, test_split="testA")).build_dataset("test")


def test_detected_boxes_match_targets_by_iou_and_count_unmatched(files, caplog):
    val = RefcocoBuilder("refcoco", config(files, boxes="det")).build_dataset("val")
    example = val[0]  # ann 3 of image 1; det regions are in reverse order, shifted by 3 px
    assert example["target"] == 0 and val.boxes == "det" and not val.image_ann_ids
    far = RefcocoBuilder("refcoco", config(files, boxes="det", target_min_iou=0.99)).build_dataset("val")
    with caplog.at_level("WARNING"):
        assert far[0]["target"] == -100 and far.num_unmatched == 1
    assert "no region of image 1 reaches IoU 0.99" in caplog.text
    batch = far.collate([far[0], far[1]])
    assert "targets" not in batch  # an evaluation batch with unusable targets carries none (no NaN loss)


def test_explicit_target_outside_the_regions_is_an_error(tmp_path):
    write_stores(tmp_path)
    write_re_txt_dbs(tmp_path, explicit_target=7)
    train = RefcocoBuilder("refcoco", config(tmp_path)).build_dataset("train")
    with pytest.raises(DataError, match=r"refcoco_train.db.*sent_id 100.*target region 7 is outside the image's 3 regions"):
        train[0]


def test_ann_id_missing_from_its_image_is_an_error(tmp_path):
    write_stores(tmp_path)
    write_re_txt_dbs(tmp_path, refs=[(10, 4, 1, "train", [(100, "the dog")])])  # ann 4 belongs to image 2
    train = RefcocoBuilder("refcoco", config(tmp_path)).build_dataset("train")
    with pytest.raises(DataError, match="ann_id 4 is not among the ann_ids"):
        train[0]


def test_txt_db_without_side_files_reads_examples_and_needs_image_sizes(tmp_path):
    write_stores(tmp_path)
    write_re_txt_dbs(tmp_path, side_files=False)
    cfg = config(tmp_path)
    cfg["refcoco"]["instances_json"] = None
    with pytest.raises(DataError, match="images.json.*instances_json"):
        RefcocoBuilder("refcoco", cfg).build_dataset("train")
    write_refer(tmp_path)
    train = RefcocoBuilder("refcoco", config(tmp_path)).build_dataset("train")
    assert sorted(train.sent_ids) == [100, 102] and train[0]["target"] == 1  # matched by IoU (gt boxes)


def test_refer_json_source(files):
    cfg = config(files, source="refer_json")
    train = RefcocoBuilder("refcoco", cfg).build_dataset("train")
    assert train.sent_ids == [100, 102] and train.num_dropped == 1
    assert train[0]["input_ids"] == [BASE_TOKENS.index("[CLS]"), *tokens("the dog"), BASE_TOKENS.index("[SEP]")]
    assert train[0]["target"] == 1 and train[1]["target"] == 1  # gt regions matched by IoU
    testb = RefcocoBuilder("refcoco", dict(cfg, test_split="testB", boxes="det")).build_dataset("test")
    assert testb.sent_ids == [106] and testb[0]["target"] == 2  # det order reversed: ann 1 is 3rd


def test_refs_pickles_are_refused_with_conversion_instructions(files):
    pickled = files / "refer" / "refs(unc).p"
    pickled.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    cfg = config(files, source="refer_json")
    cfg["refcoco"]["refs_json"] = "refer/refs(unc).p"
    with pytest.raises(DataError, match=r"refs\(unc\).p is a Python pickle.*does not unpickle.*json.dump\(pickle.load"):
        RefcocoBuilder("refcoco", cfg).build_dataset("train")
    disguised = files / "refer" / "refs.json"
    disguised.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    cfg["refcoco"]["refs_json"] = "refer/refs.json"
    with pytest.raises(DataError, match="is a Python pickle"):
        RefcocoBuilder("refcoco", cfg).build_dataset("train")


def test_missing_image_is_an_error_or_skipped(tmp_path):
    write_stores(tmp_path, gt_images={1: IMAGES[1]})
    write_re_txt_dbs(tmp_path)
    with pytest.raises(DataError, match=r"sent_id \"102\".*visual_grounding_coco_gt_000000000002.npz"):
        RefcocoBuilder("refcoco", config(tmp_path)).build_dataset("train")
    train = RefcocoBuilder("refcoco", config(tmp_path, missing_images="skip")).build_dataset("train")
    assert train.sent_ids == [100] and train.num_dropped == 2


def test_image_with_zero_boxes_is_an_error(tmp_path):
    write_stores(tmp_path, gt_images={1: IMAGES[1], 2: {}})
    write_re_txt_dbs(tmp_path)
    with pytest.raises(DataError, match=r"visual_grounding_coco_gt_000000000002.npz.*zero boxes"):
        RefcocoBuilder("refcoco", config(tmp_path)).build_dataset("train")


def test_predictions_file(files, tmp_path):
    val = RefcocoBuilder("refcoco", config(files)).build_dataset("val")
    batch = val.collate([val[0], val[1]])
    scores = torch.tensor([[0.0, 0.1, 0.9], [0.9, 0.0, 0.1]])  # right (ann 3 is region 2), then wrong
    records = val.format_predictions(batch, {"scores": scores})
    assert records[0]["pred_region"] == 2 and records[0]["correct"] and not records[1]["correct"]
    assert records[0]["pred_box"] == pytest.approx([120, 10, 60, 80], abs=0.1) and records[0]["tgt_box"] == [120, 10, 60, 80]
    data = json.loads(open(val.write_predictions(records + records[:1], str(tmp_path / "p.json"))).read())
    assert data["format"] == "villa_plugin.refcoco/v1" and data["boxes"] == "gt" and data["split"] == "val"
    assert data["accuracy"] == 0.5 and set(data["predictions"]) == {"103", "104"}


def test_evaluation_batch_keeps_every_row_that_has_a_target(files):
    """Fallback 6: one row without a usable target (-100) no longer drops the targets of the whole
    evaluation batch; the loss is that of the rows that have one."""
    matched = RefcocoBuilder("refcoco", config(files, boxes="det")).build_dataset("val")
    unmatched = RefcocoBuilder("refcoco", config(files, boxes="det", target_min_iou=0.99)).build_dataset("val")
    batch = matched.collate([matched[0], unmatched[1], matched[1]])
    assert batch["targets"].tolist() == [0, -100, 0]
    scores = torch.randn(3, int(batch["img_feat"].size(1)))
    loss = registry.get_loss_class("cross_entropy")(reduction="mean")(batch, {"scores": scores})
    keep = torch.tensor([0, 2])
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(scores[keep], batch["targets"][keep]))
