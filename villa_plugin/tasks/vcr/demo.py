"""A small VCR demo in the real formats: VCR JSON lines, UNITER txt_db, gt-box and detected-box img_dbs.

Each image has ``GT_OBJECTS`` annotated objects (gt boxes, in annotation order, tag ``[i]`` = gt box
i, whose feature carries an identity code for i) and a few detected regions (clutter, background).
Questions use VCR's token lists with person/object tags:

- Q->A: "what shape is [i] ?"  answers "it is a <shape>" (4 different shapes; the right one is the
  shape of object i);
- QA->R: rationales "because [i] is <color>" (4 different colours; the right one is object i's colour).

Files under ``root``::

    vocab.txt (padded to VOCAB_SIZE; tag i has id VOCAB_SIZE + i), VERSION.json
    {train,val,test}.jsonl                     VCR annotations (test without labels)
    txt_db/vcr_{train,val,test}.db/            UNITER txt_db (+ id2len_qa.json, id2len_qar.json)
    img_db/vcr_gt_{split}/feat_numbb100_compressed/             gt boxes, keys vcr_gt_<split>_<img_fn>.npz
    img_db/vcr_{split}/feat_th0.2_max100_min4_compressed/       detected boxes, keys vcr_<split>_<img_fn>.npz
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import numpy as np

from villa_plugin.datasets.synthetic import (
    DEMO_FEATURES,
    dump_jsonl,
    extra_prototypes,
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
SEED = 20200604
OBJECT_SHAPES = ["circle", "star"]  # what gt objects are
OBJECT_COLORS = ["red", "blue"]
ANSWERS = OBJECT_SHAPES + ["dog", "car"]  # "it is a <...>": two are never right (a text-only cue)
RATIONALES = OBJECT_COLORS + ["old", "happy"]  # "because [i] is <...>"
GT_OBJECTS = 1
DETECTED_COPIES = 3
VOCAB_SIZE = 128  # = the demo model's vocab_size, so tag ids (VOCAB_SIZE + i) match its grown table
SPLITS = {"train": 1200, "val": 150, "test": 60}  # questions (one per image)
GT_FEATURES = {"gt_conf_th": -1, "gt_num_bb": 100, "gt_min_bb": 1}
GT_KEY_FORMAT = "vcr_gt_{split}_{img_fn}.npz"
DET_KEY_FORMAT = "vcr_{split}_{img_fn}.npz"


def _tokens(text: str, tag: int) -> List[Any]:
    """VCR's token list: words as strings, ``[i]`` where the text says ``@``."""
    return [[tag] if w == "@" else w for w in text.split()]


def paths(root: str) -> Dict[str, Any]:
    """Where the demo's files are under ``root`` (whether or not they exist yet)."""
    root = os.path.abspath(root)
    splits = {split: {"annotations": os.path.join(root, f"{split}.jsonl"),
                      "txt_db": os.path.join(root, "txt_db", f"vcr_{split}.db"),
                      "img_db_gt": os.path.join(root, "img_db", f"vcr_gt_{split}"),
                      "img_db": os.path.join(root, "img_db", f"vcr_{split}")} for split in SPLITS}
    return {"root": root, "vocab": os.path.join(root, "vocab.txt"), "lowercase": True, "splits": splits,
            "img_key_format": DET_KEY_FORMAT, "gt_img_key_format": GT_KEY_FORMAT, "vocab_size": VOCAB_SIZE,
            **DEMO_FEATURES, **GT_FEATURES}


def _example(rng: np.random.Generator, split: str, n: int, protos, tag_codes) -> Dict[str, Any]:
    kinds = [int(rng.integers(len(OBJECT_SHAPES))) for _ in range(GT_OBJECTS)]
    objects = [(OBJECT_SHAPES[k], OBJECT_COLORS[k]) for k in kinds]  # each shape has its colour
    tag = int(rng.integers(GT_OBJECTS))
    shape, color = objects[tag]
    answers = list(ANSWERS)
    rng.shuffle(answers)
    rationales = list(RATIONALES)
    rng.shuffle(rationales)
    img_fn = f"demo_movie/{split}_{n:05d}.jpg"
    gt = region_record(rng, objects, object_extras=[tag_codes[i] for i in range(GT_OBJECTS)],
                       sort_by_confidence=False, protos=protos)
    # the detector finds the annotated objects again (DETECTED_COPIES boxes each) plus some clutter
    copies = [obj for obj in objects for _ in range(DETECTED_COPIES)]
    n_clutter = 0
    det = region_record(rng, copies, n_clutter=n_clutter, protos=protos,
                        n_background=max(1, DEMO_FEATURES["min_bb"] - len(copies) - n_clutter))
    ann = {
        "movie": "demo_movie", "objects": ["object"] * GT_OBJECTS, "img_fn": img_fn,
        "metadata_fn": img_fn.replace(".jpg", ".json"), "img_id": f"{split}-{n}", "annot_id": f"{split}-{n}",
        "question_number": 0, "question": _tokens("what is @ ?", tag),
        "answer_choices": [_tokens(f"a {a}", tag) for a in answers],
        "rationale_choices": [_tokens(f"@ is {c}", tag) for c in rationales],
    }
    if split != "test":
        ann["answer_label"] = answers.index(shape)
        ann["rationale_label"] = rationales.index(color)
    return {"ann": ann, "gt": gt, "det": det}


def _write(root: str) -> None:
    p = paths(root)
    words = "what shape is it a because".split() + ANSWERS + RATIONALES
    tokens = vocab_tokens(words)
    if len(tokens) > VOCAB_SIZE:
        raise ValueError(f"the demo vocabulary has {len(tokens)} tokens > VOCAB_SIZE={VOCAB_SIZE}")
    tokens += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(tokens))]
    write_vocab(p["vocab"], tokens)
    tok = WordPieceTokenizer(p["vocab"], lowercase=True)
    protos = prototypes()
    tag_codes = extra_prototypes([f"tag:{i}" for i in range(GT_OBJECTS)], SEED)
    tag_codes = [tag_codes[f"tag:{i}"] for i in range(GT_OBJECTS)]

    def ids(token_list):
        out = []
        for t in token_list:
            out.extend([VOCAB_SIZE + i for i in t] if isinstance(t, list) else tok.encode(t))
        return out

    for code, (split, n_questions) in enumerate(SPLITS.items()):
        rng = np.random.default_rng([SEED, code])
        examples = [_example(rng, split, n, protos, tag_codes) for n in range(n_questions)]
        dump_jsonl(p["splits"][split]["annotations"], [e["ann"] for e in examples])
        img_fn = lambda e: os.path.splitext(e["ann"]["img_fn"])[0].replace("/", "_")  # noqa: E731
        write_img_db(p["splits"][split]["img_db_gt"],
                     [(GT_KEY_FORMAT.format(split=split, img_fn=img_fn(e)), e["gt"]) for e in examples],
                     conf_th=-1, num_bb=GT_FEATURES["gt_num_bb"], compressed=DEMO_FEATURES["compressed"])
        write_img_db(p["splits"][split]["img_db"],
                     [(DET_KEY_FORMAT.format(split=split, img_fn=img_fn(e)), e["det"]) for e in examples],
                     **img_db_settings(DEMO_FEATURES))
        records, id2len_qa, id2len_qar = [], {}, {}
        for e in examples:
            ann = e["ann"]
            q = ids(ann["question"])
            answers = [ids(a) for a in ann["answer_choices"]]
            rationales = [ids(r) for r in ann["rationale_choices"]]
            qa_t, qar_t = ann.get("answer_label", -1), ann.get("rationale_label", -1)
            gt_answer = answers[qa_t] if qa_t >= 0 else max(answers, key=len)
            id2len_qa[ann["annot_id"]] = len(q) + max(len(a) for a in answers)
            id2len_qar[ann["annot_id"]] = len(q) + len(gt_answer) + max(len(r) for r in rationales)
            records.append((ann["annot_id"], {
                "annot_id": ann["annot_id"], "input_ids": q, "input_ids_as": answers, "input_ids_rs": rationales,
                "qa_target": qa_t, "qar_target": qar_t, "objects": ann["objects"],
                "img_fname": [GT_KEY_FORMAT.format(split=split, img_fn=img_fn(e)),
                              DET_KEY_FORMAT.format(split=split, img_fn=img_fn(e))],
            }))
        db_dir = p["splits"][split]["txt_db"]
        write_txt_db(db_dir, records, tok.meta("demo-uncased"))
        for name, obj in (("id2len_qa.json", id2len_qa), ("id2len_qar.json", id2len_qar)):
            with open(os.path.join(db_dir, name), "w", encoding="utf-8") as fh:
                json.dump(obj, fh)


def stamp() -> Dict[str, Any]:
    return {"name": "villa_plugin vcr demo", "version": VERSION, "seed": SEED, "splits": SPLITS,
            "gt_objects": GT_OBJECTS, "detected_copies": DETECTED_COPIES}


def materialise_demo(root: str) -> Dict[str, Any]:
    """Write the demo under ``root`` unless a current copy is there; returns :func:`paths`."""
    materialise(root, stamp(), _write)
    return paths(root)
