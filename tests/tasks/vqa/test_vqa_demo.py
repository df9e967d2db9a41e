"""The bundled demo: deterministic, idempotent/atomic, the real formats, and learnable answers."""
import json
import os
from collections import Counter, defaultdict

import lmdb
import numpy as np
import pytest
from omegaconf import OmegaConf

import villa_plugin.tasks.vqa.demo as demo
from villa_plugin.tasks.vqa.builder import VQA2Builder
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_common import img_db_settings
from villa_plugin.datasets.text import WordPieceTokenizer
from villa_plugin.datasets.materialise import is_current


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache") / "demo" / "vqa_v1")
    demo.materialise_demo(root)
    return root


def _content(root):
    """Every file's bytes, except LMDB files, which are compared by their key/value pairs."""
    out = {}
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if "data.mdb" in files:
            env = lmdb.open(dirpath, readonly=True, lock=False)
            with env.begin() as txn:
                out[rel] = dict(txn.cursor())
            env.close()
            continue
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                out[os.path.join(rel, name)] = fh.read()
    return out


@pytest.fixture
def small_splits(monkeypatch):
    """A small demo for the tests of the writing machinery (the full one takes seconds)."""
    monkeypatch.setattr(demo, "SPLITS", {"train": 240, "val": 40, "test": 40})


def test_two_materialisations_have_identical_content(small_splits, tmp_path):
    a = _content(demo.materialise_demo(str(tmp_path / "one" / "vqa_v1"))["root"])
    b = _content(demo.materialise_demo(str(tmp_path / "two" / "vqa_v1"))["root"])
    assert a.keys() == b.keys() and a == b
    assert len(a["img_db/demo_train/feat_th0.2_max100_min10_compressed"]) >= 240 // demo.QUESTIONS_PER_IMAGE


def test_a_changed_generator_setting_makes_the_copy_stale(small_splits, tmp_path, monkeypatch):
    root = str(tmp_path / "vqa_v1")
    demo.materialise_demo(root)
    monkeypatch.setattr(demo, "CLUTTER_PER_IMAGE", (0, 1))
    assert not is_current(root, demo._stamp())
    demo.materialise_demo(root)
    assert is_current(root, demo._stamp())


def test_materialise_is_idempotent_and_replaces_stale_copies(small_splits, tmp_path):
    root = str(tmp_path / "vqa_v1")
    paths = demo.materialise_demo(root)
    stamp_mtime = os.stat(paths["stamp"]).st_mtime_ns
    assert demo.materialise_demo(root) == paths and os.stat(paths["stamp"]).st_mtime_ns == stamp_mtime
    with open(paths["stamp"], "w") as fh:  # an old or broken copy is regenerated, not trusted
        json.dump({"version": 0}, fh)
    os.remove(paths["vocab"])
    demo.materialise_demo(root)
    assert os.path.isfile(paths["vocab"]) and is_current(root, demo._stamp())
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp dirs left behind


def test_sizes_formats_and_vocab(demo_root):
    p = demo.paths(demo_root)
    tok = WordPieceTokenizer(p["vocab"], lowercase=True)
    assert 90 <= tok.vocab_size <= 120
    counts = {}
    for split, sp in p["splits"].items():
        questions = json.load(open(sp["questions"]))["questions"]
        counts[split] = len(questions)
        for q in questions:
            assert tok.token_to_id("[UNK]") not in tok.encode(q["question"])
        db = ImgFeatDB(sp["img_db"], **img_db_settings(p))
        feat, pos = db[db.keys()[0]]
        assert feat.shape[1] == 2048 and pos.shape[1] == 7 and 10 <= feat.shape[0] <= 16
    assert counts == demo.SPLITS and counts["train"] >= 10000  # enough fresh questions not to memorise
    assert json.load(open(p["ans2label"])) == {a: i for i, a in enumerate(demo.ANSWERS)}
    assert sp["annotations"] is None  # test is unlabelled, like VQA test-dev


def test_answers_follow_from_question_and_regions(demo_root):
    p = demo.paths(demo_root)
    sp = p["splits"]["val"]
    questions = json.load(open(sp["questions"]))["questions"]
    anns = {a["question_id"]: a for a in json.load(open(sp["annotations"]))["annotations"]}
    db = ImgFeatDB(sp["img_db"], compressed=True)
    protos = demo.prototypes()
    by_text = defaultdict(set)
    for q in questions[:40]:
        feat, _ = db[demo.KEY_FORMAT.format(subtype="val", image_id=q["image_id"])]
        regions = [demo.decode_region(row.numpy(), protos) for row in feat]
        objects = [r[1:] for r in regions if r[0] == "object"]
        ann = anns[q["question_id"]]
        assert demo.answer_from(q["question"], objects) == ann["multiple_choice_answer"]
        assert sum(a["answer"] == ann["multiple_choice_answer"] for a in ann["answers"]) >= 7
        by_text[q["question"]].add(ann["multiple_choice_answer"])
    all_anns = {a["question_id"]: a for a in json.load(open(p["splits"]["train"]["annotations"]))["annotations"]}
    for q in json.load(open(p["splits"]["train"]["questions"]))["questions"]:
        by_text[q["question"]].add(all_anns[q["question_id"]]["multiple_choice_answer"])
    # the question alone does not determine the answer: frequent questions get several answers
    frequent = [t for t, answers in by_text.items() if len(answers) > 1]
    assert len(frequent) > 20


def test_vqa2_builder_demo_switch_uses_cache_dir(small_splits, tmp_path):
    conf = OmegaConf.merge({"env": {"cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path / "data")}},
                           OmegaConf.load(VQA2Builder.config_path()))
    conf.dataset_config.vqa2.demo = True
    conf.dataset_config.vqa2.num_answers = None
    builder = VQA2Builder("vqa2", conf.dataset_config.vqa2)
    builder.prepare()
    assert is_current(str(tmp_path / "cache" / "demo" / "vqa_v1"), demo._stamp())
    sizes = {s: len(builder.build_dataset(s)) for s in ("train", "val", "test")}
    assert sizes == demo.SPLITS
    val = builder.build_dataset("val")
    batch = val.collate([val[i] for i in range(4)])
    assert batch.targets.shape == (4, len(demo.ANSWERS)) and batch.img_feat.shape[-1] == 2048
    assert (batch.targets.max(dim=1).values == 1.0).all()


def test_scenes_and_question_mix(demo_root):
    """1-4 objects and 0-3 clutter regions per image; the four types in about equal shares; no
    question asked twice about one image."""
    p = demo.paths(demo_root)
    sp = p["splits"]["train"]
    db = ImgFeatDB(sp["img_db"], compressed=True)
    protos = demo.prototypes()
    questions = json.load(open(sp["questions"]))["questions"]
    anns = json.load(open(sp["annotations"]))["annotations"]
    for image_id in sorted({q["image_id"] for q in questions})[:30]:
        kinds = Counter(demo.decode_region(row.numpy(), protos)[0]
                        for row in db[demo.KEY_FORMAT.format(subtype="train", image_id=image_id)][0])
        assert 1 <= kinds["object"] <= 4 and kinds["clutter"] <= 3
    per_image = defaultdict(list)
    for q in questions:
        per_image[q["image_id"]].append(q["question"])
    assert all(len(qs) == len(set(qs)) <= demo.QUESTIONS_PER_IMAGE for qs in per_image.values())
    shares = Counter(a["question_type"] for a in anns)
    assert set(shares) == set(demo.TEMPLATES)
    assert all(0.2 <= n / len(anns) <= 0.3 for n in shares.values())


def test_question_mix_weights_are_honoured(monkeypatch):
    monkeypatch.setattr(demo, "QUESTION_MIX", {"color_of_shape": 0.0, "shape_of_color": 0.0, "count": 1.0,
                                               "exists": 0.0})
    rng = np.random.default_rng(0)
    objects = [("circle", "red"), ("square", "blue"), ("circle", "green")]
    out = demo._questions_for(rng, objects, 5)
    assert len(out) == 5 and {qtype for qtype, _, _ in out} == {"count"}
    assert all(answer == demo.answer_from(question, objects) for _, question, answer in out)
