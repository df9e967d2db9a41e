"""A small NLVR2 demo in the real formats: NLVR2 JSON lines, UNITER txt_db and img_db.

Each example is a sentence about a pair of images (coloured shapes, see ``demos/__init__.py``):

- "the left image contains a <shape>", "the right image contains a <shape>",
- "both images contain a <shape>", "neither image contains a <shape>".

The label is True/False from the shapes present in each image, so text and both images are needed.
Every sentence is written for 2 image pairs (identifiers ``<split>-<set>-<pair>-0``), so consistency
(all pairs of a sentence right) is meaningful. Files under ``root``::

    vocab.txt, VERSION.json
    annotations/{train,dev,test1}.json            NLVR2 JSON lines (identifier, sentence, label, ...)
    txt_db/nlvr2_{train,dev,test1}.db/            UNITER txt_db (input_ids, img_fname, target)
    img_db/nlvr2_{train,dev,test1}/feat_th0.2_max100_min4_compressed/  keys nlvr2_<set id>-img{0,1}.npz
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

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
SEED = 20200602
SHAPES = ["circle", "square", "triangle", "star"]
TEMPLATES = {
    "both": "both images contain a {shape}",
    "any": "at least one image contains a {shape}",
    "neither": "neither image contains a {shape}",
}
SPLITS = {"train": ("train", 1000), "val": ("dev", 150), "test": ("test1", 100)}  # split: (file name, sentences)
PAIRS_PER_SENTENCE = 2
IMG_KEY_FORMAT = "nlvr2_{image_id}-img{side}.npz"
NOISE = 0.3
OBJECTS_PER_IMAGE = 2
SENTENCE_SHAPES = ["star"]


def truth(template: str, left: bool, right: bool) -> bool:
    """The label of a template given whether the shape is in the left / right image."""
    return {"both": left and right, "any": left or right, "neither": not left and not right}[template]


def _presence(rng: np.random.Generator, template: str, label: bool) -> Tuple[bool, bool]:
    options = [(a, b) for a in (True, False) for b in (True, False) if truth(template, a, b) == label]
    return options[int(rng.integers(len(options)))]


def _image(rng: np.random.Generator, shape: str, present: bool, protos) -> Dict[str, np.ndarray]:
    # always OBJECTS_PER_IMAGE objects, so that counting objects says nothing about the label
    others = [s for s in SHAPES if s != shape]
    n_other = OBJECTS_PER_IMAGE - int(present)
    objects = [(others[int(rng.integers(len(others)))], COLORS[int(rng.integers(len(COLORS)))]) for _ in range(n_other)]
    if present:
        objects.insert(int(rng.integers(len(objects) + 1)), (shape, COLORS[int(rng.integers(len(COLORS)))]))
    n_clutter = int(rng.integers(0, 2))
    n_background = max(1, DEMO_FEATURES["min_bb"] - len(objects) - n_clutter)
    return region_record(rng, objects, n_clutter=n_clutter, n_background=n_background, protos=protos, noise=NOISE)


def paths(root: str) -> Dict[str, Any]:
    """Where the demo's files are under ``root`` (whether or not they exist yet)."""
    root = os.path.abspath(root)
    splits = {}
    for split, (name, _) in SPLITS.items():
        splits[split] = {
            "annotations": os.path.join(root, "annotations", f"{name}.json"),
            "txt_db": os.path.join(root, "txt_db", f"nlvr2_{name}.db"),
            "img_db": os.path.join(root, "img_db", f"nlvr2_{name}"),
        }
    return {"root": root, "vocab": os.path.join(root, "vocab.txt"), "lowercase": True, "splits": splits,
            "img_key_format": IMG_KEY_FORMAT, **DEMO_FEATURES}


def _write(root: str) -> None:
    p = paths(root)
    words = " ".join(TEMPLATES.values()).replace("{shape}", "").split() + SHAPES
    write_vocab(p["vocab"], vocab_tokens(words))
    tok = WordPieceTokenizer(p["vocab"], lowercase=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    protos = prototypes()
    for code, (split, (name, n_sentences)) in enumerate(SPLITS.items()):
        rng = np.random.default_rng([SEED, code])
        annotations: List[Dict[str, Any]] = []
        records = []
        for set_id in range(n_sentences):
            template = list(TEMPLATES)[set_id % len(TEMPLATES)]
            shape = SENTENCE_SHAPES[int(rng.integers(len(SENTENCE_SHAPES)))]
            sentence = TEMPLATES[template].format(shape=shape)
            first = bool(rng.integers(2))
            for pair in range(PAIRS_PER_SENTENCE):
                label = first if pair == 0 else not first  # each sentence has a True and a False pair
                left, right = _presence(rng, template, label)
                image_id = f"{name}-{set_id}-{pair}"
                for side, present in ((0, left), (1, right)):
                    records.append((IMG_KEY_FORMAT.format(image_id=image_id, side=side), _image(rng, shape, present, protos)))
                annotations.append({
                    "identifier": f"{image_id}-0", "sentence": sentence, "label": str(label),
                    "left_url": f"demo://{image_id}-img0.png", "right_url": f"demo://{image_id}-img1.png",
                    "directory": str(set_id % 100), "synset": shape, "writer": "demo",
                })
        dump_jsonl(p["splits"][split]["annotations"], annotations)
        write_img_db(p["splits"][split]["img_db"], records,
                     **img_db_settings(DEMO_FEATURES))
        examples = []
        for ann, ids in zip(annotations, tok.encode_batch([a["sentence"] for a in annotations])):
            image_id = ann["identifier"].rsplit("-", 1)[0]
            examples.append((ann["identifier"], dict(
                ann, input_ids=ids, target=1 if ann["label"] == "True" else 0,
                img_fname=[IMG_KEY_FORMAT.format(image_id=image_id, side=s) for s in (0, 1)],
            )))
        write_txt_db(p["splits"][split]["txt_db"], examples, tok.meta("demo-uncased"))


def stamp() -> Dict[str, Any]:
    return {"name": "villa_plugin nlvr2 demo", "version": VERSION, "seed": SEED,
            "splits": {k: list(v) for k, v in SPLITS.items()}}


def materialise_demo(root: str) -> Dict[str, Any]:
    """Write the demo under ``root`` unless a current copy is there; returns :func:`paths`."""
    materialise(root, stamp(), _write)
    return paths(root)
