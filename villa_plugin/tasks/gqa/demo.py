"""A small, deterministic GQA dataset in LXMERT's processed format (the bundled demo).

The scenes, questions and region features are the VQA demo's (tasks/vqa/demo.py: coloured shapes,
questions answered only by reading the regions); each question has one answer with score 1.0, as
GQA's balanced questions do. Written under ``root`` (e.g. ``<env.cache_dir>/demo/gqa_v1``)::

    vocab.txt (uncased), trainval_ans2label.json, VERSION.json
    train.json, valid.json, testdev.json, submit.json (no labels): lists of
        {"question_id": "00001000", "img_id": "1", "sent": ..., "label": {answer: 1.0}}
    img_db/demo_{split}/...   (UNITER-format LMDB features, keyed by img_id)

Our splits: train = train + valid (the official recipe), val = testdev, test = submit.
Materialisation is idempotent and atomic (villa_plugin.datasets.materialise).
"""
from __future__ import annotations

import os
from typing import Any, Dict

import numpy as np

from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.materialise import dump_json, materialise
from villa_plugin.datasets.task_common import img_db_settings
from villa_plugin.tasks.vqa import demo as scenes

VERSION = 1
SEED = 20201005
FILES = {"train": 6000, "valid": 500, "testdev": 500, "submit": 300}  # questions per file
SPLIT_FILES = {"train": ["train", "valid"], "val": ["testdev"], "test": ["submit"]}


def paths(root: str) -> Dict[str, Any]:
    """Where the demo's files are under ``root`` (whether or not they exist yet)."""
    root = os.path.abspath(root)
    files = {name: os.path.join(root, f"{name}.json") for name in FILES}
    img_dbs = {name: os.path.join(root, "img_db", f"demo_{name}") for name in FILES}
    splits = {split: {"annotations": [files[f] for f in names], "img_db": [img_dbs[f] for f in names]}
              for split, names in SPLIT_FILES.items()}
    return {"root": root, "vocab": os.path.join(root, "vocab.txt"), "lowercase": True,
            "ans2label": os.path.join(root, "trainval_ans2label.json"), "files": files, "splits": splits,
            "img_key_format": "{img_id}", "num_answers": len(scenes.ANSWERS), **scenes.FEATURE_SETTINGS}


def _write(root: str) -> None:
    protos = scenes.prototypes()
    p = paths(root)
    with open(p["vocab"], "w", encoding="utf-8") as fh:
        fh.write("\n".join(scenes.vocab_tokens()) + "\n")
    dump_json(p["ans2label"], {a: i for i, a in enumerate(scenes.ANSWERS)})
    image_id = 0
    for file_code, (name, n_questions) in enumerate(FILES.items()):
        items, records = [], []
        while len(items) < n_questions:
            image_id += 1
            rng = np.random.default_rng([SEED, file_code, image_id])
            objects, record = scenes._image(rng, protos)
            records.append((str(image_id), record))
            todo = min(scenes.QUESTIONS_PER_IMAGE, n_questions - len(items))
            for k, (_, question, answer) in enumerate(scenes._questions_for(rng, objects, todo)):
                item = {"question_id": f"{image_id * 1000 + k:08d}", "img_id": str(image_id), "sent": question}
                if name != "submit":
                    item["label"] = {answer: 1.0}
                items.append(item)
        dump_json(p["files"][name], items)
        write_img_db(os.path.join(root, "img_db", f"demo_{name}"), records, **img_db_settings(scenes.FEATURE_SETTINGS))


def materialise_demo(root: str) -> Dict[str, Any]:
    """Write the demo under ``root`` unless a current copy is there; returns :func:`paths`."""
    stamp = {"name": "villa_plugin gqa demo", "version": VERSION, "seed": SEED, "files": FILES,
             "scenes": scenes._stamp()}
    return paths(materialise(root, stamp, _write))
