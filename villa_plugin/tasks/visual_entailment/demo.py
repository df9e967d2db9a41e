"""A small SNLI-VE demo in the real formats: SNLI-VE JSON lines, UNITER txt_db and one img_db.

The premise is an image of coloured shapes (``demos/__init__.py``); the hypotheses are

- "there is a <shape>"                          -> entailment if the shape is there, else contradiction;
- "the <shape> is <wooden | old | expensive>" about a shape that is there -> neutral
  (the image cannot tell).

(A negated template, "there is no <shape>", makes the label an XOR of a text and an image bit,
which a tiny model from scratch needs far more updates to find; the demo leaves it out.)

Files under ``root``::

    vocab.txt, VERSION.json
    snli_ve_{train,dev,test}.jsonl      Flikr30kID, sentence1, sentence2, gold_label, pairID, captionID
    txt_db/ve_{train,dev,test}.db/      UNITER txt_db (input_ids, img_fname, target {labels, scores})
    img_db/flickr30k/feat_th0.2_max100_min4_compressed/   keys flickr30k_<12-digit id>.npz
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np

from villa_plugin.datasets.synthetic import (
    COLORS,
    DEMO_FEATURES,
    dump_jsonl,
    materialise,
    prototypes,
    region_record,
    vocab_tokens,
    write_vocab,
)
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.task_common import img_db_settings
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db

VERSION = 1
SEED = 20200603
SHAPES = ["circle", "square", "triangle", "star"]
HYPOTHESIS_SHAPES = ["star"]  # one queried shape keeps the demo learnable in seconds
LABELS = ["contradiction", "entailment", "neutral"]  # UNITER's label ids 0, 1, 2
TEMPLATES = {
    "present": "there is a {shape}",
    "unknown": "the {shape} is {property}",
}
PROPERTIES = ["wooden", "old", "expensive"]
SPLITS = {"train": ("train", 1200), "val": ("dev", 150), "test": ("test", 100)}  # split: (file name, images)
IMG_KEY_FORMAT = "flickr30k_{image_id:012d}.npz"
OBJECTS_PER_IMAGE = 3
SHAPE_COPIES = 2  # a present shape appears twice: a stronger image signal for the CLS-pooled head


def gold_label(template: str, present: bool) -> str:
    """The demo's ground truth for a hypothesis template about a shape that is / is not there."""
    if template == "unknown":
        return "neutral"
    return "entailment" if present else "contradiction"


def _image(rng: np.random.Generator, shape: str, present: bool, protos) -> Dict[str, np.ndarray]:
    others = [s for s in SHAPES if s != shape]
    n_shape = SHAPE_COPIES if present else 0
    objects = [(others[int(rng.integers(len(others)))], COLORS[int(rng.integers(len(COLORS)))])
               for _ in range(OBJECTS_PER_IMAGE - n_shape)]
    for _ in range(n_shape):
        objects.insert(int(rng.integers(len(objects) + 1)), (shape, COLORS[int(rng.integers(len(COLORS)))]))
    n_clutter = int(rng.integers(0, 2))
    return region_record(rng, objects, n_clutter=n_clutter, protos=protos,
                         n_background=max(1, DEMO_FEATURES["min_bb"] - len(objects) - n_clutter))


def paths(root: str) -> Dict[str, Any]:
    """Where the demo's files are under ``root`` (whether or not they exist yet)."""
    root = os.path.abspath(root)
    splits = {split: {"annotations": os.path.join(root, f"snli_ve_{name}.jsonl"),
                      "txt_db": os.path.join(root, "txt_db", f"ve_{name}.db"),
                      "img_db": os.path.join(root, "img_db", "flickr30k")}
              for split, (name, _) in SPLITS.items()}
    return {"root": root, "vocab": os.path.join(root, "vocab.txt"), "lowercase": True, "splits": splits,
            "img_key_format": IMG_KEY_FORMAT, **DEMO_FEATURES}


def _write(root: str) -> None:
    p = paths(root)
    words = " ".join(TEMPLATES.values()).replace("{shape}", "").replace("{property}", "").split()
    words += SHAPES + " ".join(PROPERTIES).split() + ["an", "image", "with", "shapes"]
    write_vocab(p["vocab"], vocab_tokens(words))
    tok = WordPieceTokenizer(p["vocab"], lowercase=True)
    protos = prototypes()
    records = []
    image_id = 1000000
    for code, (split, (name, n_images)) in enumerate(SPLITS.items()):
        rng = np.random.default_rng([SEED, code])
        annotations: List[Dict[str, Any]] = []
        for _ in range(n_images):
            image_id += 1
            shape = HYPOTHESIS_SHAPES[int(rng.integers(len(HYPOTHESIS_SHAPES)))]
            present = bool(rng.integers(2))
            records.append((IMG_KEY_FORMAT.format(image_id=image_id), _image(rng, shape, present, protos)))
            for k, template in enumerate(TEMPLATES):
                if template == "unknown" and not present:
                    continue  # a property of a shape that is not there would be a contradiction
                prop = PROPERTIES[int(rng.integers(len(PROPERTIES)))]
                label = gold_label(template, present)
                annotations.append({
                    "Flikr30kID": f"{image_id}.jpg", "sentence1": "an image with shapes",
                    "sentence2": TEMPLATES[template].format(shape=shape, property=prop), "gold_label": label,
                    "pairID": f"{image_id}.jpg#0r{k}{label[0]}", "captionID": f"{image_id}.jpg#0",
                })
        dump_jsonl(p["splits"][split]["annotations"], annotations)
        examples = []
        for ann, ids in zip(annotations, tok.encode_batch([a["sentence2"] for a in annotations])):
            image = IMG_KEY_FORMAT.format(image_id=int(ann["Flikr30kID"].split(".")[0]))
            target = {"labels": [LABELS.index(ann["gold_label"])], "scores": [1.0]}
            examples.append((ann["pairID"], dict(ann, input_ids=ids, img_fname=image, target=target)))
        write_txt_db(p["splits"][split]["txt_db"], examples, tok.meta("demo-uncased"))
    write_img_db(p["splits"]["train"]["img_db"], records,
                 **img_db_settings(DEMO_FEATURES))


def stamp() -> Dict[str, Any]:
    return {"name": "villa_plugin snli-ve demo", "version": VERSION, "seed": SEED,
            "splits": {k: list(v) for k, v in SPLITS.items()}}


def materialise_demo(root: str) -> Dict[str, Any]:
    """Write the demo under ``root`` unless a current copy is there; returns :func:`paths`."""
    materialise(root, stamp(), _write)
    return paths(root)
