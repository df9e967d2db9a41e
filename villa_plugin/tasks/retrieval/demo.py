"""A small image-text retrieval demo in the real formats: a Karpathy-split JSON, UNITER ITM txt_dbs
and one img_db.

Each image shows one coloured shape (plus clutter and background regions, see ``demos/__init__.py``)
and has 3 captions naming its colour and shape ("a red circle", "there is a red circle", ...). Within
each split every (shape, colour) combination appears at most once (train: all 48 once), so each
caption has exactly one matching image and no sampled negative is a true match: retrieval needs both
words bound to the right region, and chance R@1 is 1 / #images. Files under ``root``::

    vocab.txt, VERSION.json
    dataset_demo.json                          Karpathy-style (images: filename, imgid, split, sentences)
    txt_db/itm_demo_{train,val,test}.db/       UNITER ITM txt_db (input_ids, img_fname, raw, sentid)
    img_db/demo/feat_th0.2_max100_min4_compressed/   keys demo_<12-digit id>.npz
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np

from villa_plugin.datasets.synthetic import (
    COLORS,
    DEMO_FEATURES,
    SHAPES,
    dump_json,
    materialise,
    prototypes,
    region_record,
    vocab_tokens,
    write_vocab,
)
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.task_common import img_db_settings
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db

VERSION = 2
SEED = 20200603
TEMPLATES = ["a {color} {shape}", "there is a {color} {shape}", "a picture of a {color} {shape}",
             "one {color} {shape} and some clutter"]
CAPTIONS_PER_IMAGE = 3
SPLITS = {"train": 48, "val": 24, "test": 24}  # images per split (48 = every shape/colour combination once)
IMG_KEY_FORMAT = "demo_{stem:0>12}.npz"


def paths(root: str) -> Dict[str, Any]:
    """Where the demo's files are under ``root`` (whether or not they exist yet)."""
    root = os.path.abspath(root)
    return {
        "root": root, "vocab": os.path.join(root, "vocab.txt"), "lowercase": True,
        "karpathy_json": os.path.join(root, "dataset_demo.json"),
        "karpathy_splits": {s: [s] for s in SPLITS},
        "txt_db": {s: os.path.join(root, "txt_db", f"itm_demo_{s}.db") for s in SPLITS},
        "img_db": os.path.join(root, "img_db", "demo"),
        "img_key_format": IMG_KEY_FORMAT, **DEMO_FEATURES,
    }


def _objects(rng: np.random.Generator, n: int) -> List[Tuple[str, str]]:
    """``n`` distinct (shape, colour) pairs: no two images of a split show the same thing, so no
    "negative" of a query is a true match (hard-negative mining would find such false negatives)."""
    combos = [(s, c) for s in SHAPES for c in COLORS]
    return [combos[i] for i in rng.permutation(len(combos))[:n]]


def _write(root: str) -> None:
    p = paths(root)
    words = " ".join(TEMPLATES).replace("{color}", "").replace("{shape}", "").split() + SHAPES + COLORS
    write_vocab(p["vocab"], vocab_tokens(words))
    tok = WordPieceTokenizer(p["vocab"], lowercase=True)
    protos = prototypes()
    images: List[Dict[str, Any]] = []
    records = []
    image_id = sent_id = 0
    for code, (split, n_images) in enumerate(SPLITS.items()):
        rng = np.random.default_rng([SEED, code])
        for shape, color in _objects(rng, n_images):
            image_id += 1
            filename = f"{image_id}.jpg"
            n_clutter = int(rng.integers(1, 3))
            record = region_record(rng, [(shape, color)], n_clutter=n_clutter,
                                   n_background=max(1, DEMO_FEATURES["min_bb"] - 1 - n_clutter), protos=protos)
            records.append((IMG_KEY_FORMAT.format(stem=str(image_id)), record))
            sentences = []
            for t in rng.permutation(len(TEMPLATES))[:CAPTIONS_PER_IMAGE]:
                raw = TEMPLATES[int(t)].format(color=color, shape=shape)
                sentences.append({"raw": raw, "tokens": raw.split(), "imgid": image_id, "sentid": sent_id})
                sent_id += 1
            images.append({"filename": filename, "imgid": image_id, "split": split, "filepath": "demo",
                           "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    dump_json(p["karpathy_json"], {"dataset": "demo", "images": images})
    write_img_db(p["img_db"], records, **img_db_settings(DEMO_FEATURES))
    for split in SPLITS:
        sents = [(img, s) for img in images if img["split"] == split for s in img["sentences"]]
        ids = tok.encode_batch([s["raw"] for _, s in sents])
        examples = [(str(s["sentid"]), {"input_ids": x, "img_fname": IMG_KEY_FORMAT.format(stem=str(img["imgid"])),
                                        "raw": s["raw"], "sentid": s["sentid"]}) for (img, s), x in zip(sents, ids)]
        write_txt_db(p["txt_db"][split], examples, tok.meta("demo-uncased"))


def stamp() -> Dict[str, Any]:
    return {"name": "villa_plugin retrieval demo", "version": VERSION, "seed": SEED, "splits": SPLITS}


def materialise_demo(root: str) -> Dict[str, Any]:
    """Write the demo under ``root`` unless a current copy is there; returns :func:`paths`."""
    materialise(root, stamp(), _write)
    return paths(root)
