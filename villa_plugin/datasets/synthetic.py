"""Generic pieces of the bundled task demos (``villa_plugin/tasks/<task>/demo.py``).

Images are sets of coloured shapes (the VQA demo's, ``villa_plugin.tasks.vqa.demo``; every demo
shares the shape/colour prototypes defined here): an object region's 2048-d feature is the sum of
its shape's and colour's sparse prototypes plus noise; "clutter" and low-confidence "background" regions fill
the image. Each task demo writes its files with :func:`materialise`, which is idempotent and atomic
(generated in a temp dir next to the target, renamed into place, stamped with a version).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from villa_plugin.datasets.materialise import dump_json, materialise  # noqa: F401  (re-exported)

FEAT_DIM = 2048
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
PROTOTYPE_SEED = 20200601  # the VQA demo's seed: the prototypes predate the other demos
# Fewer regions than the VQA demo (min_bb 4): the task demos must train in seconds on a CPU.
DEMO_FEATURES = {"conf_th": 0.2, "max_bb": 100, "min_bb": 4, "num_bb": 36, "compressed": True}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BLOCK = 64  # dimensions per prototype


# -- shape / colour prototypes ------------------------------------------------------------------
def _sparse_prototypes(names: Sequence[str], dims: Any, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """One prototype per name: ``_BLOCK`` dimensions drawn from ``dims`` (an int n means range(n)),
    valued uniformly in [1, 2); the rest 0."""
    blocks = rng.permutation(dims)[: len(names) * _BLOCK].reshape(len(names), _BLOCK)
    out = {}
    for name, block in zip(names, blocks):
        vec = np.zeros(FEAT_DIM, dtype=np.float32)
        vec[block] = rng.uniform(1.0, 2.0, size=_BLOCK)
        out[name] = vec
    return out


def prototypes() -> Dict[str, np.ndarray]:
    """One sparse non-negative 2048-d prototype per shape, colour, 'clutter' and 'background'."""
    names = [f"shape:{s}" for s in SHAPES] + [f"color:{c}" for c in COLORS] + ["clutter", "background"]
    return _sparse_prototypes(names, FEAT_DIM, np.random.default_rng(PROTOTYPE_SEED))


def decode_region(feat: np.ndarray, protos: Optional[Dict[str, np.ndarray]] = None) -> Tuple[str, ...]:
    """Read a region back: ``('object', shape, color)``, ``('clutter',)`` or ``('background',)``."""
    protos = protos or prototypes()
    feat = np.asarray(feat, dtype=np.float32)
    score = {name: float(feat[p > 0].mean()) for name, p in protos.items()}
    best_shape = max(SHAPES, key=lambda s: score[f"shape:{s}"])
    best_color = max(COLORS, key=lambda c: score[f"color:{c}"])
    if score[f"shape:{best_shape}"] > 0.5 and score[f"color:{best_color}"] > 0.5:
        return ("object", best_shape, best_color)
    return ("clutter",) if score["clutter"] > score["background"] else ("background",)


# -- regions -------------------------------------------------------------------------------------
def extra_prototypes(names: Sequence[str], seed: int) -> Dict[str, np.ndarray]:
    """Sparse prototypes for ``names`` on dimensions the shape/colour prototypes do not use."""
    used = np.zeros(FEAT_DIM, dtype=bool)
    for vec in prototypes().values():
        used |= vec > 0
    free = np.flatnonzero(~used)
    if len(names) * _BLOCK > free.size:
        raise ValueError(f"not enough free feature dimensions for {len(names)} extra prototypes")
    return _sparse_prototypes(names, free, np.random.default_rng(seed))


def _noise(rng: np.random.Generator, scale: float) -> np.ndarray:
    noise = np.zeros(FEAT_DIM, dtype=np.float32)
    if scale > 0:
        idx = rng.choice(FEAT_DIM, size=FEAT_DIM // 20, replace=False)
        noise[idx] = np.abs(rng.normal(0.0, scale, size=idx.size))
    return noise


def _box(rng: np.random.Generator, lo: float, hi: float) -> List[float]:
    w, h = rng.uniform(lo, hi, size=2)
    x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return [x1, y1, x1 + w, y1 + h, w, h]


def region_record(
    rng: np.random.Generator,
    objects: Sequence[Tuple[str, str]],
    n_clutter: int = 0,
    n_background: int = 0,
    object_extras: Optional[Sequence[Optional[np.ndarray]]] = None,
    sort_by_confidence: bool = True,
    protos: Optional[Mapping[str, np.ndarray]] = None,
    noise: float = 0.3,
    random_boxes: bool = True,
) -> Dict[str, np.ndarray]:
    """An img_db record ``{features, norm_bb, conf}`` for ``objects`` [(shape, color)].

    ``object_extras[i]`` (optional) is added to object i's feature (e.g. a VCR tag's identity code).
    Objects come first when ``sort_by_confidence`` is False (gt-box stores keep annotation order).
    ``noise``: scale of the sparse non-negative noise added to every feature (the VQA demo's 0.3;
    less noise gives the model fewer per-image details to memorise). ``random_boxes=False`` gives
    every region of a kind the same box, so box geometry carries no per-image noise either.
    """
    def box(lo: float, hi: float) -> List[float]:
        if random_boxes:
            return _box(rng, lo, hi)
        side = (lo + hi) / 2
        return [0.5 - side / 2, 0.5 - side / 2, 0.5 + side / 2, 0.5 + side / 2, side, side]

    protos = protos or prototypes()
    feats, confs, boxes = [], [], []
    for i, (shape, color) in enumerate(objects):
        vec = protos[f"shape:{shape}"] + protos[f"color:{color}"]
        if object_extras is not None and object_extras[i] is not None:
            vec = vec + object_extras[i]
        feats.append(vec + _noise(rng, noise))
        confs.append(rng.uniform(0.6, 0.99))
        boxes.append(box(0.1, 0.35))
    for _ in range(n_clutter):
        feats.append(protos["clutter"] + _noise(rng, noise))
        confs.append(rng.uniform(0.25, 0.55))
        boxes.append(box(0.05, 0.3))
    for _ in range(n_background):
        feats.append(0.5 * protos["background"] + _noise(rng, noise))
        confs.append(rng.uniform(0.01, 0.18))
        boxes.append(box(0.4, 1.0))
    order = np.argsort(-np.asarray(confs), kind="stable") if sort_by_confidence else np.arange(len(confs))
    return {
        "features": np.asarray(feats, dtype=np.float32)[order],
        "norm_bb": np.asarray(boxes, dtype=np.float32)[order],
        "conf": np.asarray(confs, dtype=np.float32)[order][:, None],
    }


def random_objects(rng: np.random.Generator, low: int, high: int, shapes: Sequence[str] = SHAPES,
                   colors: Sequence[str] = COLORS) -> List[Tuple[str, str]]:
    """``low..high`` objects with random shapes and colours."""
    n = int(rng.integers(low, high + 1))
    return [(shapes[int(rng.integers(len(shapes)))], colors[int(rng.integers(len(colors)))]) for _ in range(n)]


# -- text ----------------------------------------------------------------------------------------
def vocab_tokens(words: Iterable[str], extra: Sequence[str] = ()) -> List[str]:
    """An uncased WordPiece vocabulary: specials, punctuation, ``words`` (whole), ``extra``, then
    letters and ``##`` letters so that any lower-case word is tokenisable."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = SPECIAL_TOKENS + ["!", "?", ".", ","] + sorted(set(words)) + list(extra)
    tokens += [str(d) for d in range(10)]
    tokens += [c for c in letters if c not in tokens] + [f"##{c}" for c in letters]
    seen, out = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


# -- files ---------------------------------------------------------------------------------------
def dump_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


def write_vocab(path: str, tokens: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(tokens) + "\n")


__all__ = [
    "COLORS",
    "SHAPES",
    "DEMO_FEATURES",
    "prototypes",
    "extra_prototypes",
    "region_record",
    "random_objects",
    "vocab_tokens",
    "dump_json",
    "dump_jsonl",
    "write_vocab",
    "materialise",
]
