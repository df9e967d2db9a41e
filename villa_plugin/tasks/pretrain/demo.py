"""A small pre-training demo in the real formats: captions of coloured-shape images, with soft labels.

Images are the shared shape/colour regions of ``datasets/synthetic.py`` (the VQA demo's prototypes),
so a model pre-trained here can be fine-tuned on ``projects/villa/demo.yaml``; the captions use the
VQA demo's vocabulary for the same reason. Each image has 1-3 objects (+ clutter / background
regions), and two captions list its objects ("a red circle , a blue star in the image").

Each region stores ``soft_labels`` [n, 1601]: the detector-like class distribution (0.8 on the
region's class: 1 + shape * 8 + colour for objects, 49 for clutter, 0 = background; the rest spread
uniformly), so MRC-kl has a target.

Files under ``root``::

    vocab.txt, VERSION.json
    captions_{train,val}.json                 COCO captions format (images, annotations)
    txt_db/pretrain_demo_{train,val}.db/      UNITER pre-training txt_db (input_ids, img_fname)
    img_db/demo/feat_th0.2_max100_min4_compressed/   keys demo_<12-digit id>.npz (with soft_labels)
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.synthetic import COLORS, DEMO_FEATURES, SHAPES, dump_json, materialise, prototypes, region_record
from villa_plugin.datasets.task_common import img_db_settings
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db
from villa_plugin.tasks.pretrain.heads import IMG_LABEL_DIM
from villa_plugin.tasks.vqa.demo import vocab_tokens

VERSION = 1
SEED = 20200609
SPLITS = {"train": 800, "val": 120}  # images per split; two captions per image
CAPTIONS_PER_IMAGE = 2
OBJECTS_PER_IMAGE = (1, 3)
CLUTTER_CLASS = 1 + len(SHAPES) * len(COLORS)
SOFT_LABEL_PEAK = 0.8
KEY_FORMAT = "demo_{image_id:012d}.npz"


def region_class(kind: Tuple[str, ...]) -> int:
    """The demo detector's class of a region: ``('object', shape, color)``, ``('clutter',)``, ``('background',)``."""
    if kind[0] == "object":
        return 1 + SHAPES.index(kind[1]) * len(COLORS) + COLORS.index(kind[2])
    return CLUTTER_CLASS if kind[0] == "clutter" else 0


def soft_labels(classes: Sequence[int]) -> np.ndarray:
    """``[n, 1601]`` rows: ``SOFT_LABEL_PEAK`` on each class, the rest uniform."""
    rows = np.full((len(classes), IMG_LABEL_DIM), (1 - SOFT_LABEL_PEAK) / (IMG_LABEL_DIM - 1), dtype=np.float32)
    rows[np.arange(len(classes)), list(classes)] = SOFT_LABEL_PEAK
    return rows


def caption(objects: Sequence[Tuple[str, str]], rng: np.random.Generator) -> str:
    """The objects in a random order: ``a <color> <shape> , a <color> <shape> in the image``."""
    order = rng.permutation(len(objects))
    return " , ".join(f"a {objects[i][1]} {objects[i][0]}" for i in order) + " in the image"


def _image(rng: np.random.Generator, protos) -> Tuple[List[Tuple[str, str]], Dict[str, np.ndarray]]:
    n_obj = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    objects = [(SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]) for _ in range(n_obj)]
    n_clutter = int(rng.integers(0, 2))
    n_bg = max(1, DEMO_FEATURES["min_bb"] - n_obj - n_clutter)
    # objects, clutter, background in this order (= by confidence), so the class of each row is known
    record = region_record(rng, objects, n_clutter=n_clutter, n_background=n_bg, sort_by_confidence=False, protos=protos)
    kinds = [("object",) + (s, c) for s, c in objects] + [("clutter",)] * n_clutter + [("background",)] * n_bg
    record["soft_labels"] = soft_labels([region_class(k) for k in kinds])
    return objects, record


def paths(root: str) -> Dict[str, Any]:
    """Where the demo's files are under ``root`` (whether or not they exist yet)."""
    root = os.path.abspath(root)
    splits = {split: {"captions": os.path.join(root, f"captions_{split}.json"),
                      "txt_db": os.path.join(root, "txt_db", f"pretrain_demo_{split}.db"),
                      "img_db": os.path.join(root, "img_db", "demo")} for split in SPLITS}
    return {"root": root, "vocab": os.path.join(root, "vocab.txt"), "lowercase": True, "splits": splits,
            "img_key_format": "{file_stem_lower}.npz", **DEMO_FEATURES}


def _write(root: str) -> None:
    p = paths(root)
    with open(p["vocab"], "w", encoding="utf-8") as fh:
        fh.write("\n".join(vocab_tokens()) + "\n")
    tok = WordPieceTokenizer(p["vocab"], lowercase=True)
    protos = prototypes()
    records, image_id = [], 0
    for code, (split, n_images) in enumerate(SPLITS.items()):
        rng = np.random.default_rng([SEED, code])
        images, annotations = [], []
        for _ in range(n_images):
            image_id += 1
            objects, record = _image(rng, protos)
            key = KEY_FORMAT.format(image_id=image_id)
            records.append((key, record))
            images.append({"id": image_id, "file_name": key.replace(".npz", ".jpg")})
            for _ in range(CAPTIONS_PER_IMAGE):
                annotations.append({"id": len(annotations) + 1 + 100000 * code, "image_id": image_id,
                                    "caption": caption(objects, rng)})
        dump_json(p["splits"][split]["captions"], {"images": images, "annotations": annotations})
        examples = []
        for ann, ids in zip(annotations, tok.encode_batch([a["caption"] for a in annotations])):
            examples.append((str(ann["id"]), {"input_ids": ids, "img_fname": KEY_FORMAT.format(image_id=ann["image_id"])}))
        write_txt_db(p["splits"][split]["txt_db"], examples, tok.meta("demo-uncased"))
    write_img_db(p["splits"]["train"]["img_db"], records, **img_db_settings(DEMO_FEATURES))


def stamp() -> Dict[str, Any]:
    return {"name": "villa_plugin pre-training demo", "version": VERSION, "seed": SEED, "splits": dict(SPLITS)}


def materialise_demo(root: str) -> Dict[str, Any]:
    """Write the demo under ``root`` unless a current copy is there; returns :func:`paths`."""
    materialise(root, stamp(), _write)
    return paths(root)
