"""A small referring-expression demo in the real formats: the refer toolkit's files (as JSON), UNITER
RE txt_dbs with their side files, and a gt-box and a detected-box img_db.

Each image (640x480-like, in pixels) holds 3-5 coloured shapes with distinct (shape, colour), one per
cell of a 3x2 grid, so different objects never overlap. Expressions name the referred object by what
makes it unique in its image ("the red circle", "the circle" when it is the only circle, "the red
one" when it is the only red object), so the expression and the regions are both needed. The
gt-box store has one region per annotation, in the image's ``ann_ids`` order (UNITER's
``re_coco_gt``); the detected-box store has each object's box jittered (IoU >= 0.6 with the gt box)
plus clutter regions, sorted by confidence (``re_coco_det``). Files under ``root``::

    vocab.txt, VERSION.json
    refer/refs(unc).json, refer/instances.json        refer toolkit (refs list, COCO-style instances)
    txt_db/refcoco_{train,val,testA,testB}.db/         UNITER RE txt_db + refs/annotations/images/categories.json
    img_db/re_demo_gt/feat_numbb100/, img_db/re_demo_det/feat_numbb100/
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np

from villa_plugin.datasets.synthetic import (
    COLORS,
    FEAT_DIM,
    SHAPES,
    dump_json,
    materialise,
    prototypes,
    vocab_tokens,
    write_vocab,
)
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.task_common import img_db_settings
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db

VERSION = 1
SEED = 20200604
SPLITS = {"train": 300, "val": 40, "testA": 40, "testB": 40}  # images per split
REFS_PER_IMAGE = 2
SENTENCES_PER_REF = 2
IMAGE_SIZES = [(640, 480), (500, 375), (480, 640), (640, 427)]
FEATURES = {"conf_th": -1, "max_bb": 100, "min_bb": 10, "num_bb": 100, "compressed": True}
KEY_FORMATS = {"gt": "visual_grounding_coco_gt_{image_id:012d}.npz", "det": "visual_grounding_det_coco_{image_id:012d}.npz"}
WORDS = ["the", "one", "that", "is", "object"]


def paths(root: str) -> Dict[str, Any]:
    """Where the demo's files are under ``root`` (whether or not they exist yet)."""
    root = os.path.abspath(root)
    return {
        "root": root, "vocab": os.path.join(root, "vocab.txt"), "lowercase": True, "variant": "refcoco",
        "refs_json": os.path.join(root, "refer", "refs(unc).json"),
        "instances_json": os.path.join(root, "refer", "instances.json"),
        "txt_db": {s: os.path.join(root, "txt_db", f"refcoco_{s}.db") for s in SPLITS},
        "img_db": {"gt": os.path.join(root, "img_db", "re_demo_gt"), "det": os.path.join(root, "img_db", "re_demo_det")},
        "img_key_format": dict(KEY_FORMATS), **FEATURES,
    }


def expressions(target: Tuple[str, str], objects: List[Tuple[str, str]]) -> List[str]:
    """Expressions that single out ``target`` (shape, colour) among ``objects``."""
    shape, color = target
    out = [f"the {color} {shape}", f"{color} {shape}", f"the {shape} that is {color}"]
    if sum(s == shape for s, _ in objects) == 1:
        out.append(f"the {shape}")
    if sum(c == color for _, c in objects) == 1:
        out += [f"the {color} one", f"the {color} object"]
    return out


def _noise(rng: np.random.Generator, scale: float) -> np.ndarray:
    noise = np.zeros(FEAT_DIM, dtype=np.float32)
    idx = rng.choice(FEAT_DIM, size=FEAT_DIM // 20, replace=False)
    noise[idx] = np.abs(rng.normal(0.0, scale, size=idx.size))
    return noise


def _norm_bb(box: List[float], width: float, height: float) -> List[float]:
    x, y, w, h = box
    return [x / width, y / height, (x + w) / width, (y + h) / height, w / width, h / height]


def _iou(a: List[float], b: List[float]) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _image(rng: np.random.Generator, width: int, height: int):
    """Objects [(shape, colour)] and their pixel boxes [x, y, w, h], one per grid cell."""
    combos = [(s, c) for s in SHAPES for c in COLORS]
    n = int(rng.integers(3, 6))
    objects = [combos[i] for i in rng.choice(len(combos), size=n, replace=False)]
    cw, ch = width / 3, height / 2
    boxes = []
    for cell in rng.choice(6, size=n, replace=False):
        cx, cy = (cell % 3) * cw, (cell // 3) * ch
        w, h = rng.uniform(0.55, 0.9) * cw, rng.uniform(0.55, 0.9) * ch
        x, y = cx + rng.uniform(0, cw - w), cy + rng.uniform(0, ch - h)
        boxes.append([round(float(v), 2) for v in (x, y, w, h)])
    return objects, boxes


def _records(rng, objects, boxes, width, height, protos):
    """The gt-box and detected-box img_db records of one image."""
    feats = [protos[f"shape:{s}"] + protos[f"color:{c}"] for s, c in objects]
    gt = {"features": np.asarray([f + _noise(rng, 0.3) for f in feats], np.float32),
          "norm_bb": np.asarray([_norm_bb(b, width, height) for b in boxes], np.float32),
          "conf": np.full((len(boxes), 1), 0.99, np.float32)}
    det_feats, det_boxes, det_conf = [], [], []
    for f, b in zip(feats, boxes):
        while True:
            j = [b[0] + rng.uniform(-0.1, 0.1) * b[2], b[1] + rng.uniform(-0.1, 0.1) * b[3],
                 b[2] * rng.uniform(0.9, 1.1), b[3] * rng.uniform(0.9, 1.1)]
            j = [max(0.0, j[0]), max(0.0, j[1]), min(j[2], width - max(0.0, j[0])), min(j[3], height - max(0.0, j[1]))]
            if _iou(j, b) >= 0.6:
                break
        det_feats.append(f + _noise(rng, 0.5))
        det_boxes.append(_norm_bb(j, width, height))
        det_conf.append(rng.uniform(0.6, 0.99))
    for _ in range(int(rng.integers(1, 3))):
        w, h = rng.uniform(0.1, 0.3) * width, rng.uniform(0.1, 0.3) * height
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        det_feats.append(protos["clutter"] + _noise(rng, 0.5))
        det_boxes.append(_norm_bb([x, y, w, h], width, height))
        det_conf.append(rng.uniform(0.25, 0.55))
    order = np.argsort(-np.asarray(det_conf), kind="stable")
    det = {"features": np.asarray(det_feats, np.float32)[order], "norm_bb": np.asarray(det_boxes, np.float32)[order],
           "conf": np.asarray(det_conf, np.float32)[order][:, None]}
    return gt, det


def _write(root: str) -> None:
    p = paths(root)
    write_vocab(p["vocab"], vocab_tokens(WORDS + SHAPES + COLORS))
    tok = WordPieceTokenizer(p["vocab"], lowercase=True)
    protos = prototypes()
    images, annotations, refs = [], [], []
    gt_records, det_records = [], []
    image_id = ann_id = ref_id = sent_id = 0
    for code, (split, n_images) in enumerate(SPLITS.items()):
        rng = np.random.default_rng([SEED, code])
        for _ in range(n_images):
            image_id += 1
            width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
            objects, boxes = _image(rng, width, height)
            ann_ids = []
            for (shape, color), box in zip(objects, boxes):
                ann_id += 1
                ann_ids.append(ann_id)
                annotations.append({"id": ann_id, "image_id": image_id, "bbox": box, "area": box[2] * box[3],
                                    "category_id": SHAPES.index(shape) + 1, "iscrowd": 0})
            images.append({"id": image_id, "file_name": f"COCO_demo_{image_id:012d}.jpg", "width": width,
                           "height": height, "ann_ids": ann_ids, "split": split})
            gt, det = _records(rng, objects, boxes, width, height, protos)
            gt_records.append((KEY_FORMATS["gt"].format(image_id=image_id), gt))
            det_records.append((KEY_FORMATS["det"].format(image_id=image_id), det))
            for k in rng.choice(len(objects), size=REFS_PER_IMAGE, replace=False):
                ref_id += 1
                options = expressions(objects[k], objects)
                sentences = []
                for e in rng.choice(len(options), size=SENTENCES_PER_REF, replace=False):
                    sent_id += 1
                    raw = options[int(e)]
                    sentences.append({"sent_id": sent_id, "sent": raw, "raw": raw, "tokens": raw.split()})
                refs.append({"ref_id": ref_id, "ann_id": ann_ids[k], "image_id": image_id, "split": split,
                             "category_id": SHAPES.index(objects[k][0]) + 1, "file_name": images[-1]["file_name"],
                             "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences]})
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    os.makedirs(os.path.dirname(p["refs_json"]), exist_ok=True)
    dump_json(p["refs_json"], refs)
    dump_json(p["instances_json"], {"images": [{k: v for k, v in img.items() if k not in ("ann_ids", "split")} for img in images],
                                    "annotations": annotations, "categories": categories})
    for kind, records in (("gt", gt_records), ("det", det_records)):
        write_img_db(p["img_db"][kind], records, **img_db_settings(FEATURES))
    anns_by_id = {a["id"]: a for a in annotations}
    for split in SPLITS:
        split_refs = [r for r in refs if r["split"] == split]
        sents = [(r, s) for r in split_refs for s in r["sentences"]]
        examples = [(str(s["sent_id"]), {"sent_id": s["sent_id"], "sent": s["sent"], "ref_id": r["ref_id"],
                                         "ann_id": r["ann_id"], "image_id": r["image_id"], "bbox": anns_by_id[r["ann_id"]]["bbox"],
                                         "input_ids": ids, "img_fname": KEY_FORMATS["gt"].format(image_id=r["image_id"])})
                    for (r, s), ids in zip(sents, tok.encode_batch([s["sent"] for _, s in sents]))]
        db = p["txt_db"][split]
        meta = tok.meta("demo-uncased")
        meta["toker"] = meta["bert"]  # UNITER's RE dbs name the tokenizer under 'toker'
        write_txt_db(db, examples, meta)
        split_images = {r["image_id"] for r in split_refs}
        dump_json(os.path.join(db, "refs.json"), split_refs)
        dump_json(os.path.join(db, "annotations.json"), [a for a in annotations if a["image_id"] in split_images])
        dump_json(os.path.join(db, "images.json"), [{k: v for k, v in img.items() if k != "split"}
                                                    for img in images if img["id"] in split_images])
        dump_json(os.path.join(db, "categories.json"), categories)


def stamp() -> Dict[str, Any]:
    return {"name": "villa_plugin refcoco demo", "version": VERSION, "seed": SEED, "splits": SPLITS}


def materialise_demo(root: str) -> Dict[str, Any]:
    """Write the demo under ``root`` unless a current copy is there; returns :func:`paths`."""
    materialise(root, stamp(), _write)
    return paths(root)
