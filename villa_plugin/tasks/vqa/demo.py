"""A small, deterministic VQA dataset in the real on-disk formats (the bundled demo).

Each image holds 1-4 coloured shapes, 0-3 shapeless "clutter" regions and low-confidence
background regions (at least 10 regions in all, UNITER's ``min_bb``). A region's 2048-d feature is a
sparse non-negative code: the sum of its shape's and colour's prototypes (disjoint blocks of
dimensions) plus noise, so the answer to

- "what color is the <shape>?"        (colour of the only <shape>)
- "what shape is the <color> object?" (shape of the only <color> object)
- "how many <shape>s are there?"      (0-3)
- "is there a <color> <shape>?"       (yes / no; a "no" is half-true: the colour or the shape is there)

is a deterministic function of the question words *and* the regions: neither alone answers it
(the best answer per question text scores about 0.45 vqa_accuracy on val: the soft VQA scores
give partial credit on yes/no and counts).

Sizes are chosen for a demo that learns the cross-modal binding in about a thousand updates of a
tiny UNITER trained from scratch: 16k training questions (8 per image, types drawn with the weights
of ``QUESTION_MIX``) so that a run sees fresh questions rather than memorising 2k; at most 4
objects and 3 clutter regions per image, because every extra distractor delays the moment the model
starts to bind words to regions (counting and "is there" are learnt last).

Written files (under ``root``, e.g. ``<env.cache_dir>/demo/vqa_v1``)::

    vocab.txt, ans2label.json, VERSION.json
    questions_{split}.json, annotations_{split}.json (train, val; test has no annotations)
    img_db/demo_{split}/feat_th0.2_max100_min10_compressed/ + nbb_th0.2_max100_min10.json

Materialisation is idempotent and atomic (a temp dir renamed into place, a version stamp).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.task_common import img_db_settings
from villa_plugin.datasets.materialise import dump_json, materialise
from villa_plugin.datasets.synthetic import COLORS, FEAT_DIM, SHAPES, decode_region, prototypes  # noqa: F401  (re-exported)

VERSION = 2
SEED = 20200601
COUNTS = ["0", "1", "2", "3"]
ANSWERS = ["yes", "no"] + COLORS + SHAPES + COUNTS
SPLITS = {"train": 16000, "val": 500, "test": 300}  # questions per split
QUESTIONS_PER_IMAGE = 8
FEATURE_SETTINGS = {"conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36, "compressed": True}
KEY_FORMAT = "demo_{subtype}_{image_id:012d}.npz"

TEMPLATES = {
    "color_of_shape": ["what color is the {shape}?", "what is the color of the {shape}?",
                       "which color does the {shape} have?"],
    "shape_of_color": ["what shape is the {color} object?", "which shape is {color}?",
                       "what is the shape of the {color} object?"],
    "count": ["how many {shapes} are there?", "how many {shapes} are in the image?",
              "what is the number of {shapes}?"],
    "exists": ["is there a {color} {shape}?", "is there a {color} {shape} in the picture?",
               "can you see a {color} {shape}?"],
}
ANSWER_TYPES = {"color_of_shape": "other", "shape_of_color": "other", "count": "number", "exists": "yes/no"}
OBJECTS_PER_IMAGE = (1, 4)  # inclusive ranges per image
CLUTTER_PER_IMAGE = (0, 3)
NOISE_STD = 0.3  # |N(0, NOISE_STD)| on a random 5% of the dimensions of every region
QUESTION_MIX = {"color_of_shape": 1.0, "shape_of_color": 1.0, "count": 1.0, "exists": 1.0}  # sampling weights


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


# -- vocabulary ----------------------------------------------------------------------------------
def vocab_tokens() -> List[str]:
    """The demo's uncased WordPiece vocabulary (specials first; letters make every word tokenisable)."""
    words = set()
    for templates in TEMPLATES.values():
        for t in templates:
            words.update(re.sub(r"\{\w+\}|\?", " ", t).split())
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", "?", ".", ","]
    tokens += sorted(words | set(SHAPES) | set(COLORS))
    tokens += ["##s", "##es"] + [str(d) for d in range(10)]
    tokens += [c for c in letters if c not in tokens] + [f"##{c}" for c in letters]
    return tokens


# -- region features: the shared shape/colour prototypes (datasets/synthetic.py) ----------------
def _image(rng: np.random.Generator, protos: Dict[str, np.ndarray]):
    """One image: its objects [(shape, color)] and its region record (sorted by confidence)."""
    while True:
        n_obj = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
        shapes = rng.choice(len(SHAPES), size=n_obj)
        if max(Counter(shapes.tolist()).values()) <= 3:
            break
    colors = rng.choice(len(COLORS), size=n_obj)
    objects = [(SHAPES[s], COLORS[c]) for s, c in zip(shapes, colors)]
    n_clutter = int(rng.integers(CLUTTER_PER_IMAGE[0], CLUTTER_PER_IMAGE[1] + 1))
    n_bg = max(0, FEATURE_SETTINGS["min_bb"] - n_obj - n_clutter) + int(rng.integers(0, 4))
    feats, confs, boxes = [], [], []
    for kind_count, kind in ((n_obj, "object"), (n_clutter, "clutter"), (n_bg, "background")):
        for j in range(kind_count):
            if kind == "object":
                vec = protos[f"shape:{objects[j][0]}"] + protos[f"color:{objects[j][1]}"]
                conf, size = rng.uniform(0.6, 0.99), (0.1, 0.35)
            elif kind == "clutter":
                vec, conf, size = protos["clutter"].copy(), rng.uniform(0.25, 0.55), (0.05, 0.3)
            else:
                vec, conf, size = 0.5 * protos["background"], rng.uniform(0.01, 0.18), (0.4, 1.0)
            noise = np.zeros(FEAT_DIM, dtype=np.float32)
            idx = rng.choice(FEAT_DIM, size=FEAT_DIM // 20, replace=False)
            noise[idx] = np.abs(rng.normal(0.0, NOISE_STD, size=idx.size))
            feats.append(vec + noise)
            confs.append(conf)
            w, h = rng.uniform(*size, size=2)
            x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            boxes.append([x1, y1, x1 + w, y1 + h, w, h])
    order = np.argsort(-np.asarray(confs), kind="stable")
    record = {
        "features": np.asarray(feats, dtype=np.float32)[order],
        "norm_bb": np.asarray(boxes, dtype=np.float32)[order],
        "conf": np.asarray(confs, dtype=np.float32)[order][:, None],
    }
    return objects, record


# -- questions -----------------------------------------------------------------------------------
def answer_from(question: str, objects: Sequence[Tuple[str, str]]) -> str:
    """The demo's ground truth: the answer to ``question`` about ``objects`` [(shape, color)]."""
    q = question.lower()
    shape = next((s for s in SHAPES if re.search(rf"\b{s}(e?s)?\b", q)), None)
    color = next((c for c in COLORS if re.search(rf"\b{c}\b", q)), None)
    if q.startswith("how many") or q.startswith("what is the number"):
        return str(sum(1 for s, _ in objects if s == shape))
    if q.startswith("is there") or q.startswith("can you see"):
        return "yes" if (shape, color) in set(objects) else "no"
    if shape is not None and "color" in q:
        return next(c for s, c in objects if s == shape)
    if color is not None and "shape" in q:
        return next(s for s, c in objects if c == color)
    raise ValueError(f"not a demo question: {question!r}")


def _slots_for(rng: np.random.Generator, qtype: str, objects) -> Optional[Dict[str, str]]:
    """Template slots for one ``qtype`` question about ``objects``; None when the image cannot ask it."""
    shape_counts = Counter(s for s, _ in objects)
    color_counts = Counter(c for _, c in objects)
    if qtype == "color_of_shape":
        unique_shapes = [s for s in SHAPES if shape_counts[s] == 1]
        return {"shape": unique_shapes[int(rng.integers(len(unique_shapes)))]} if unique_shapes else None
    if qtype == "shape_of_color":
        unique_colors = [c for c in COLORS if color_counts[c] == 1]
        return {"color": unique_colors[int(rng.integers(len(unique_colors)))]} if unique_colors else None
    if qtype == "count":
        pool = list(shape_counts) if rng.random() < 0.6 else SHAPES
        return {"shapes": plural(pool[int(rng.integers(len(pool)))])}
    if rng.random() < 0.5:
        shape, color = objects[int(rng.integers(len(objects)))]
    else:
        present = set(objects)
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present
                  and (shape_counts[s] or color_counts[c])]  # hard negatives: half-true
        shape, color = absent[int(rng.integers(len(absent)))]
    return {"shape": shape, "color": color}


def _questions_for(rng: np.random.Generator, objects, n: int) -> List[Tuple[str, str, str]]:
    """Up to ``n`` distinct (question_type, question, answer) triples about one image; the types are
    drawn with the weights of ``QUESTION_MIX`` among those the image can answer."""
    types = list(QUESTION_MIX)
    weights = np.asarray([QUESTION_MIX[t] for t in types], dtype=np.float64)
    out, seen = [], set()
    for _ in range(4 * n):  # a few redraws for types the image cannot ask and repeated questions
        if len(out) == n:
            break
        qtype = types[int(rng.choice(len(types), p=weights / weights.sum()))]
        slots = _slots_for(rng, qtype, objects)
        if slots is None:
            continue
        templates = TEMPLATES[qtype]
        question = templates[int(rng.integers(len(templates)))].format(**slots)
        if question in seen:
            continue
        seen.add(question)
        out.append((qtype, question, answer_from(question, objects)))
    return out


def _annotator_answers(rng: np.random.Generator, qtype: str, answer: str) -> List[str]:
    """Ten VQA-style annotator answers: mostly the truth, a few plausible mistakes (soft scores)."""
    group = {"color_of_shape": COLORS, "shape_of_color": SHAPES, "count": COUNTS, "exists": ["yes", "no"]}[qtype]
    n_wrong = int(rng.choice([0, 0, 0, 0, 1, 1, 2, 3]))
    wrong = [a for a in group if a != answer]
    return [answer] * (10 - n_wrong) + [wrong[int(rng.integers(len(wrong)))] for _ in range(n_wrong)]


# -- writing -------------------------------------------------------------------------------------
def paths(root: str) -> Dict[str, Any]:
    """Where the demo's files are under ``root`` (whether or not they exist yet)."""
    root = os.path.abspath(root)
    split_paths = {}
    for split in SPLITS:
        split_paths[split] = {
            "questions": os.path.join(root, f"questions_{split}.json"),
            "annotations": os.path.join(root, f"annotations_{split}.json") if split != "test" else None,
            "img_db": os.path.join(root, "img_db", f"demo_{split}"),
        }
    return {"root": root, "vocab": os.path.join(root, "vocab.txt"), "ans2label": os.path.join(root, "ans2label.json"),
            "stamp": os.path.join(root, "VERSION.json"), "splits": split_paths, "img_key_format": KEY_FORMAT,
            "lowercase": True, "num_answers": len(ANSWERS), **FEATURE_SETTINGS}


def _stamp() -> Dict[str, Any]:
    """What the files depend on: a copy with another stamp is regenerated."""
    return {"name": "villa_plugin vqa demo", "version": VERSION, "seed": SEED, "splits": SPLITS,
            "questions_per_image": QUESTIONS_PER_IMAGE, "objects": list(OBJECTS_PER_IMAGE),
            "clutter": list(CLUTTER_PER_IMAGE), "noise_std": NOISE_STD, "question_mix": QUESTION_MIX}


def _write(root: str) -> None:
    protos = prototypes()
    p = paths(root)
    with open(p["vocab"], "w", encoding="utf-8") as fh:
        fh.write("\n".join(vocab_tokens()) + "\n")
    dump_json(p["ans2label"], {a: i for i, a in enumerate(ANSWERS)})
    image_id = 0
    for split_code, (split, n_questions) in enumerate(SPLITS.items()):
        questions, annotations, records = [], [], []
        while len(questions) < n_questions:
            image_id += 1
            rng = np.random.default_rng([SEED, split_code, image_id])
            objects, record = _image(rng, protos)
            records.append((KEY_FORMAT.format(subtype=split, image_id=image_id), record))
            todo = min(QUESTIONS_PER_IMAGE, n_questions - len(questions))
            for k, (qtype, question, answer) in enumerate(_questions_for(rng, objects, todo)):
                qid = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                answers = _annotator_answers(rng, qtype, answer)
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": qtype,
                    "answer_type": ANSWER_TYPES[qtype], "multiple_choice_answer": answer,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                for j, a in enumerate(answers)],
                })
        info = {"description": "villa_plugin synthetic VQA demo", "version": VERSION}
        dump_json(p["splits"][split]["questions"], {"info": info, "task_type": "Open-Ended", "data_type": "demo",
                                                "data_subtype": split, "questions": questions})
        if p["splits"][split]["annotations"]:
            dump_json(p["splits"][split]["annotations"], {"info": info, "data_type": "demo", "data_subtype": split,
                                                      "annotations": annotations})
        settings = img_db_settings(FEATURE_SETTINGS)
        write_img_db(p["splits"][split]["img_db"], records, **settings)


def materialise_demo(root: str) -> Dict[str, Any]:
    """Write the demo under ``root`` unless a current copy is there; returns :func:`paths`.

    The files are generated in a temp dir next to ``root`` and renamed into place, so a crash never
    leaves a half-written dataset and concurrent callers (ranks) end with one complete copy.
    """
    return paths(materialise(root, _stamp(), _write))
