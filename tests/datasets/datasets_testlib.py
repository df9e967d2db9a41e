"""Small on-disk data makers shared by the dataset tests (all under tmp_path, no network).

Imported by the test modules (not a conftest, so it cannot clash with other folders' conftests)."""
import json
import os

import numpy as np
import pytest

BASE_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", "?", ".", "what", "color", "is", "the",
               "umbrella", "##s", "dog", "how", "many", "are", "there", "Dog", "Color", "yes", "no", "cat"]


def region_record(n, conf, seed=0, dim=2048, soft_labels=False):
    """A BUTD-like record with ``n`` boxes (fp32; the writer stores fp16)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.5, size=(n, 2))
    wh = rng.uniform(0.1, 0.5, size=(n, 2))
    rec = {
        "features": rng.uniform(0, 3, size=(n, dim)).astype(np.float32),
        "norm_bb": np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32),
        "conf": np.asarray(conf, dtype=np.float32).reshape(n, 1),
    }
    if soft_labels:
        rec["soft_labels"] = rng.dirichlet(np.ones(5), size=n).astype(np.float32)
    return rec


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(BASE_TOKENS) + "\n", encoding="utf-8")
    return str(path)


def write_vqa_json(root, split, questions, annotations=None, subtype=None):
    """VQA v2-style question (and annotation) files; returns their paths."""
    q_path = os.path.join(root, f"q_{split}.json")
    with open(q_path, "w") as fh:
        json.dump({"data_subtype": subtype or split, "questions": questions}, fh)
    a_path = None
    if annotations is not None:
        a_path = os.path.join(root, f"a_{split}.json")
        with open(a_path, "w") as fh:
            json.dump({"annotations": annotations}, fh)
    return q_path, a_path
