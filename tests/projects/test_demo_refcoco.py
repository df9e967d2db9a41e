"""`mmf_run config=projects/villa/demo_refcoco.yaml`: the bundled referring-expression demo trains
with the real trainer (VILLA on) and learns; it evaluates on gt and detected boxes (UNITER txt_db
and refer JSON sources); the unchanged RefCOCO experiment config starts on UNITER-format data."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from villa_plugin import cli
import villa_plugin.tasks.refcoco.demo as demo
from villa_plugin.datasets.features import ImgFeatDB, write_img_db
from villa_plugin.datasets.text import TxtDB, write_txt_db

from demo_task_runner import one_torch_thread  # noqa: F401  (autouse fixture)

CHANCE = 1 / 3  # 3-5 objects per image



def _evaluations(out: str):
    return [json.loads(line[line.index('{"update"'):]) for line in out.splitlines() if '{"update"' in line]


def test_demo_files_are_in_the_real_formats(tmp_path):
    p = demo.materialise_demo(str(tmp_path / "refcoco_v1"))
    refs = json.load(open(p["refs_json"]))
    instances = json.load(open(p["instances_json"]))
    assert {r["split"] for r in refs} == set(demo.SPLITS) and "annotations" in instances
    db = TxtDB(p["txt_db"]["val"])
    images = {i["id"]: i for i in json.load(open(os.path.join(db.db_dir, "images.json")))}
    example = db[db.ids[0]]
    gt = ImgFeatDB(p["img_db"]["gt"], conf_th=-1, num_bb=100, compressed=True)
    det = ImgFeatDB(p["img_db"]["det"], conf_th=-1, num_bb=100, compressed=True)
    _, pos = gt[demo.KEY_FORMATS["gt"].format(image_id=example["image_id"])]
    img = images[example["image_id"]]
    k = img["ann_ids"].index(example["ann_id"])  # gt store: regions in ann_ids order
    expected = [example["bbox"][0] / img["width"], example["bbox"][1] / img["height"]]
    assert np.allclose(pos[k, :2].numpy(), expected, atol=1e-3)
    _, det_pos = det[demo.KEY_FORMATS["det"].format(image_id=example["image_id"])]
    assert det_pos.size(0) > pos.size(0)  # detections add clutter regions
    with open(os.path.join(db.db_dir, "meta.json")) as fh:
        assert json.load(fh)["toker"] == "demo-uncased"


def test_demo_trains_with_villa_and_learns_on_gt_and_detected_boxes(tmp_path, capsys):
    save, cache = tmp_path / "save", tmp_path / "cache"
    common = [f"env.save_dir={save}", f"env.cache_dir={cache}", "training.device=cpu", "training.log_format=json"]
    start = time.perf_counter()
    assert cli.run(["config=projects/villa/demo_refcoco.yaml", *common]) == 0
    seconds = time.perf_counter() - start
    final = [e for e in _evaluations(capsys.readouterr().out) if "val/refcoco/refcoco_accuracy" in e][-1]
    print(f"refcoco demo (gt boxes): {final} in {seconds:.1f} s")
    assert final["val/refcoco/refcoco_accuracy"] > 2 * CHANCE
    # the trained model on detected boxes, read from the refer toolkit's JSON this time
    assert cli.run(["config=projects/villa/demo_refcoco.yaml", *common, "run_type=val", f"checkpoint.resume_file={save}/best.ckpt",
                    "dataset_config.refcoco.boxes=det", "dataset_config.refcoco.source=refer_json"]) == 0
    det = [e for e in _evaluations(capsys.readouterr().out) if "val/refcoco/refcoco_accuracy" in e][-1]
    print(f"refcoco demo (detected boxes): {det}")
    assert det["val/refcoco/refcoco_accuracy"] > 1.5 * CHANCE
    out = tmp_path / "pred.json"
    assert cli.run(["config=projects/villa/demo_refcoco.yaml", *common, "run_type=predict", f"checkpoint.resume_file={save}/best.ckpt",
                    "dataset_config.refcoco.test_split=testB", f"evaluation.predict_file={out}"]) == 0
    pred = json.load(open(out))
    assert pred["format"] == "villa_plugin.refcoco/v1" and pred["split"] == "test" and pred["variant"] == "refcoco"
    assert pred["variant_split"] == "testB" and pred["boxes"] == "gt"
    assert len(pred["predictions"]) == demo.SPLITS["testB"] * demo.REFS_PER_IMAGE * demo.SENTENCES_PER_REF


# -- the unchanged experiment config on UNITER-format data ---------------------------------------
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
META = {"toker": "bert-base-cased", "CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [999, 28996]}


def _write_refcoco(root, rng):
    images, anns, refs = [], [], []
    gt_records, det_records = [], []
    ann_id = sent_id = 0
    for image_id in range(1, 7):
        boxes = [[40.0 * k, 10.0, 30.0, 40.0] for k in range(3)]
        ids = list(range(ann_id + 1, ann_id + 4))
        ann_id += 3
        anns += [{"id": a, "image_id": image_id, "bbox": b, "category_id": 1} for a, b in zip(ids, boxes)]
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 200, "height": 100, "ann_ids": ids})
        norm = np.asarray([[x / 200, y / 100, (x + w) / 200, (y + h) / 100, w / 200, h / 100] for x, y, w, h in boxes], np.float32)
        rec = {"features": rng.uniform(0, 2, (3, 2048)).astype(np.float32), "norm_bb": norm, "conf": np.ones((3, 1), np.float32)}
        gt_records.append((f"visual_grounding_coco_gt_{image_id:012d}.npz", rec))
        det_records.append((f"visual_grounding_det_coco_{image_id:012d}.npz", rec))
        refs.append({"ref_id": image_id, "ann_id": ids[image_id % 3], "image_id": image_id,
                     "split": "train" if image_id <= 4 else "val", "sent_ids": [sent_id, sent_id + 1]})
        sent_id += 2
    write_img_db(os.path.join(root, "img_db", "re_coco_gt"), gt_records, conf_th=-1, num_bb=100)
    write_img_db(os.path.join(root, "img_db", "re_coco_det"), det_records, conf_th=-1, num_bb=100)
    by_id = {a["id"]: a for a in anns}
    for split in ("train", "val"):
        split_refs = [r for r in refs if r["split"] == split]
        examples = [(str(s), {"sent_id": s, "ref_id": r["ref_id"], "ann_id": r["ann_id"], "image_id": r["image_id"],
                              "bbox": by_id[r["ann_id"]]["bbox"], "input_ids": rng.integers(1000, 5000, 6).tolist()})
                    for r in split_refs for s in r["sent_ids"]]
        db = os.path.join(root, "txt_db", f"refcoco_{split}.db")
        write_txt_db(db, examples, META)
        for name, obj in (("refs", split_refs), ("annotations", anns), ("images", images), ("categories", [])):
            with open(os.path.join(db, f"{name}.json"), "w") as fh:
                json.dump(obj, fh)


def test_refcoco_experiment_config_starts_on_uniter_format_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    _write_refcoco(str(data / "uniter"), rng)
    arch = [f"model_config.villa.architecture.{k}={v}" for k, v in TINY.items()]
    assert cli.run([
        "config=projects/villa/refcoco.yaml", f"env.data_dir={data}", f"env.save_dir={tmp_path / 'save'}",
        "training.device=cpu", "training.max_updates=2", "training.num_workers=0", "training.batch_size=4",
        "training.evaluation_interval=2", "training.log_format=json", "model_config.villa.pretrained_checkpoint=",
        "run_type=train_val", *arch,
    ]) == 0
    evals = [e for e in _evaluations(capsys.readouterr().out) if "val/refcoco/refcoco_accuracy" in e]
    # 4 val sentences (2 refs x 2): the accuracy counts whole sentences, none dropped or doubled
    assert evals and (evals[-1]["val/refcoco/refcoco_accuracy"] * 4) == pytest.approx(round(evals[-1]["val/refcoco/refcoco_accuracy"] * 4))
