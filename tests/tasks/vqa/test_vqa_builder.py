"""The `vqa2` builder: UNITER txt_db/img_db source, VQA JSON source, filters, predictions, errors."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from datasets_testlib import region_record, vocab_file, write_vqa_json  # noqa: F401 (vocab_file: fixture)
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.tasks.vqa.builder import VQA2Builder
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db
from villa_plugin.registry import registry

ANSWERS = ["net", "yes", "no", "2"]
CONF10 = [0.9] * 10


def _key(i, subtype="train2014"):
    return f"coco_{subtype}_{i:012d}.npz"


def _base(tmp_path, **over):
    (tmp_path / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    cfg = {"source": "txt_db", "data_dir": str(tmp_path), "ans2label": "ans2label.json", "num_answers": 4,
           "max_txt_len": 60, "conf_th": 0.2, "max_bb": 100, "min_bb": 10, "num_bb": 36, "compressed": False,
           "lengths_include_cls_sep": True, "img_key_format": "coco_{subtype}_{image_id:012d}.npz"}
    cfg.update(over)
    return cfg


def _img_db(tmp_path, name="img_db/coco", keys=(1, 2), nboxes=(10, 12), subtype="train2014"):
    write_img_db(str(tmp_path / name), [(_key(i, subtype), region_record(n, [0.9] * n, seed=i))
                                        for i, n in zip(keys, nboxes)])
    return name


def _txt_db(tmp_path, name, examples):
    write_txt_db(str(tmp_path / name), examples, {"bert": "tiny", "CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1})
    return name


# -- source txt_db -------------------------------------------------------------------------------
def _uniter_files(tmp_path):
    img = _img_db(tmp_path)
    txt = _txt_db(tmp_path, "txt_db/train.db", [
        ("101", {"input_ids": [5, 6, 7], "img_fname": _key(1), "target": {"labels": [1, 2], "scores": [1.0, 0.3]}}),
        ("102", {"input_ids": [5] * 8, "img_fname": _key(2), "target": {"labels": [0], "scores": [0.6]}}),
        ("103", {"input_ids": [9], "img_fname": _key(2), "target": {"labels": [], "scores": []}}),
    ])
    return img, txt


def test_txt_db_source_items_lengths_targets_and_filter(tmp_path):
    img, txt = _uniter_files(tmp_path)
    cfg = _base(tmp_path, max_txt_len=5, txt_db={"train": [txt], "val": [txt]}, img_db={"train": [img], "val": [img]})
    builder = VQA2Builder("vqa2", cfg)
    train = builder.build_dataset("train")
    assert len(train) == 2 and train.num_dropped == 1  # 102 has 8 tokens > 5: dropped, not truncated
    assert train.lengths() == [3 + 2 + 10, 1 + 2 + 12]
    item = train[0]
    assert item["id"] == 101 and item["input_ids"] == [2, 5, 6, 7, 3]
    assert item["img_feat"].shape == (10, 2048) and item["img_pos_feat"].shape == (10, 7)
    batch = train.collate([train[0], train[1]])
    assert batch.targets.tolist() == [[0, 1.0, pytest.approx(0.3), 0], [0, 0, 0, 0]]
    assert batch.dataset_name == "vqa2" and batch.dataset_type == "train"
    val = builder.build_dataset("val")  # evaluation keeps every question
    assert len(val) == 3 and val.num_dropped == 0
    no_cls = VQA2Builder("vqa2", dict(cfg, lengths_include_cls_sep=False)).build_dataset("val")
    assert no_cls.lengths() == [13, 20, 13]


def test_txt_dbs_pair_with_img_dbs_in_order(tmp_path):
    a = _img_db(tmp_path, "img_db/a", keys=(1,), nboxes=(10,))
    b = _img_db(tmp_path, "img_db/b", keys=(7,), nboxes=(11,), subtype="val2014")
    ta = _txt_db(tmp_path, "txt_db/a.db", [("1", {"input_ids": [5], "img_fname": _key(1)})])
    tb = _txt_db(tmp_path, "txt_db/b.db", [("2", {"input_ids": [5], "img_fname": _key(7, "val2014")})])
    ds = VQA2Builder("vqa2", _base(tmp_path, txt_db={"test": [ta, tb]}, img_db={"test": [a, b]})).build_dataset("test")
    assert ds.lengths() == [13, 14] and ds.qids == [1, 2]
    assert "targets" not in ds.collate([ds[0], ds[1]])
    with pytest.raises(DataError, match=r'example "2": image "coco_val2014_000000000007.npz" is in none of the img_dbs'):
        VQA2Builder("vqa2", _base(tmp_path, txt_db={"test": [ta, tb]}, img_db={"test": [a]})).build_dataset("test")
    with pytest.raises(ConfigError, match="need 1 or 2 img_dbs"):
        VQA2Builder("vqa2", _base(tmp_path, txt_db={"test": [ta, tb]}, img_db={"test": [a, b, a]})).build_dataset("test")


def test_txt_dbs_with_different_tokenizers_are_rejected(tmp_path):
    img = _img_db(tmp_path, keys=(1,), nboxes=(10,))
    write_txt_db(str(tmp_path / "x.db"), [("1", {"input_ids": [5], "img_fname": _key(1)})], {"bert": "bert-base-cased", "CLS": 101, "SEP": 102})
    write_txt_db(str(tmp_path / "y.db"), [("2", {"input_ids": [5], "img_fname": _key(1)})], {"bert": "bert-base-uncased", "CLS": 101, "SEP": 102})
    with pytest.raises(DataError, match="different tokenizers"):
        VQA2Builder("vqa2", _base(tmp_path, txt_db={"val": ["x.db", "y.db"]}, img_db={"val": [img]})).build_dataset("val")


# -- source vqa_json -----------------------------------------------------------------------------
def _json_files(tmp_path, vocab_file):
    img = _img_db(tmp_path)
    questions = [{"image_id": 1, "question": "What color is the dog?", "question_id": 1000},
                 {"image_id": 2, "question": "how many dogs are there?", "question_id": 2000},
                 {"image_id": 2, "question": "is the cat the umbrella is the dog what", "question_id": 2001}]
    anns = [{"question_id": 1000, "answers": [{"answer": a} for a in ["Yes"] * 4 + ["no"] * 2 + ["cat"] * 4]},
            {"question_id": 2000, "answers": [{"answer": a} for a in ["two"] * 3 + ["2"] + ["no"] * 1 + ["x"] * 5]},
            {"question_id": 2001, "answers": [{"answer": "blue"}] * 10}]
    q, a = write_vqa_json(str(tmp_path), "train", questions, anns, subtype="train2014")
    qt, _ = write_vqa_json(str(tmp_path), "test", questions[:1], None, subtype="train2014")
    return _base(tmp_path, source="vqa_json", vocab=vocab_file, lowercase=True,
                 questions={"train": [q], "val": [q], "test": [qt]}, annotations={"train": [a], "val": [a], "test": []},
                 img_db={"train": [img], "val": [img], "test": [img]}, max_txt_len=8)


def test_json_source_tokenises_scores_and_maps_images(tmp_path, vocab_file):
    cfg = _json_files(tmp_path, vocab_file)
    tok = WordPieceTokenizer(vocab_file, lowercase=True)
    train = VQA2Builder("vqa2", cfg).build_dataset("train")
    assert train.qids == [1000, 2000] and train.num_dropped == 1  # the 9-token question is dropped
    item = train[1]
    assert item["input_ids"] == [2] + tok.encode("how many dogs are there?") + [3]
    assert train.img_keys == [_key(1), _key(2)]
    batch = train.collate([train[0], train[1]])
    # BUTD scores: "yes" x4 -> 1.0, "no" x2 -> 0.6 ; "two"/"2" normalise to "2": 4 -> 1.0, "no" x1 -> 0.3
    assert batch.targets.tolist() == [[0, 1.0, pytest.approx(0.6), 0], [0, 0, pytest.approx(0.3), 1.0]]
    val = VQA2Builder("vqa2", cfg).build_dataset("val")
    assert len(val) == 3 and val.collate([val[2]]).targets.sum() == 0  # unanswerable: zero target
    min3 = VQA2Builder("vqa2", dict(cfg, soft_score="min3")).build_dataset("train")
    assert min3.collate([min3[0]]).targets[0, 2].item() == pytest.approx(2 / 3)
    test = VQA2Builder("vqa2", cfg).build_dataset("test")
    assert "targets" not in test.collate([test[0]])


def test_json_source_errors(tmp_path, vocab_file):
    cfg = _json_files(tmp_path, vocab_file)
    with pytest.raises(DataError, match=r'question 2000: image "coco_train2014_000000000002.npz" is in none of the img_dbs'):
        bad_img = _img_db(tmp_path, "img_db/only1", keys=(1,), nboxes=(10,))
        VQA2Builder("vqa2", dict(cfg, img_db={"train": [bad_img]})).build_dataset("train")
    with pytest.raises(DataError, match=r"nothere.json.*visualqa.org"):
        VQA2Builder("vqa2", dict(cfg, questions={"train": ["nothere.json"]}, annotations={})).build_dataset("train")
    with pytest.raises(DataError, match=r"novocab.txt"):
        VQA2Builder("vqa2", dict(cfg, vocab=str(tmp_path / "novocab.txt"))).build_dataset("train")
    with pytest.raises(ConfigError, match="soft_score"):
        VQA2Builder("vqa2", dict(cfg, soft_score="vote")).build_dataset("train")
    (tmp_path / "a_short.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="Question 1000 .* has no annotation"):
        VQA2Builder("vqa2", dict(cfg, annotations={"train": ["a_short.json"]})).build_dataset("train")


# -- shared --------------------------------------------------------------------------------------
def test_missing_files_and_bad_config(tmp_path):
    img, txt = _uniter_files(tmp_path)
    cfg = _base(tmp_path, txt_db={"val": [txt]}, img_db={"val": [img]})
    with pytest.raises(DataError, match=r"nope.json.*utils/ans2label.json"):
        VQA2Builder("vqa2", dict(cfg, ans2label="nope.json")).build_dataset("val")
    with pytest.raises(DataError, match=r"txt_db directory not found: .*gone.db"):
        VQA2Builder("vqa2", dict(cfg, txt_db={"val": ["gone.db"]})).build_dataset("val")
    with pytest.raises(DataError, match=r"img_db/gone.*download_vqa|img_db/gone.*convert"):
        VQA2Builder("vqa2", dict(cfg, img_db={"val": ["img_db/gone"]})).build_dataset("val")
    with pytest.raises(ConfigError, match="num_answers=2 is smaller than the 4 answers"):
        VQA2Builder("vqa2", dict(cfg, num_answers=2)).build_dataset("val")
    with pytest.raises(ConfigError, match='splits train, val, test; got "dev"'):
        VQA2Builder("vqa2", cfg).build_dataset("dev")
    with pytest.raises(ConfigError, match="source must be"):
        VQA2Builder("vqa2", dict(cfg, source="mmf_lmdb")).build_dataset("val")
    assert VQA2Builder("vqa2", dict(cfg, num_answers=None)).build_dataset("val").num_answers == 4


def test_predictions_format_and_file(tmp_path):
    img, txt = _uniter_files(tmp_path)
    ds = VQA2Builder("vqa2", _base(tmp_path, num_answers=6, txt_db={"test": [txt]}, img_db={"test": [img]})).build_dataset("test")
    batch = ds.collate([ds[0], ds[1]])
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 0.0, 2.0, 0.0, 0.0]])
    records = ds.format_predictions(batch, {"scores": scores})
    # columns beyond the answer vocabulary (padding up to num_answers) are never predicted
    assert records == [{"question_id": 101, "answer": "yes"}, {"question_id": 102, "answer": "2"}]
    path = ds.write_predictions(records + records[:1], str(tmp_path / "out" / "vqa2_test.json"))
    saved = json.loads(open(path).read())
    assert saved == records and all(isinstance(r["question_id"], int) for r in saved)


def test_registered_with_bundled_yaml(tmp_path):
    cls = registry.get_builder_class("vqa2")
    assert cls is VQA2Builder
    conf = OmegaConf.load(cls.config_path())
    node = conf.dataset_config.vqa2
    assert node.demo is False and node.max_txt_len == 60 and node.num_answers is None  # = len(ans2label)
    assert (node.conf_th, node.max_bb, node.min_bb, node.num_bb) == (0.2, 100, 10, 36)
    full = OmegaConf.merge({"env": {"cache_dir": str(tmp_path / "c"), "data_dir": str(tmp_path / "d")}}, conf)
    builder = cls("vqa2", full.dataset_config.vqa2)
    assert builder.cfg["demo_dir"] == str(tmp_path / "c" / "demo" / "vqa_v1")
    with pytest.raises(DataError, match=r"d/uniter/ans2label.json.*demo=true"):
        builder.build_dataset("val")
    (tmp_path / "d" / "uniter").mkdir(parents=True)
    (tmp_path / "d" / "uniter" / "ans2label.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(DataError, match=r"d/uniter/img_db/coco_val2014"):  # the split's image dbs open first
        builder.build_dataset("val")


def test_loader_workers_read_lmdb_after_fork(tmp_path):
    img, txt = _uniter_files(tmp_path)
    ds = VQA2Builder("vqa2", _base(tmp_path, txt_db={"val": [txt]}, img_db={"val": [img]})).build_dataset("val")
    ds[0]  # the parent opened the dbs before forking
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ds.collate)
    qids = [q for batch in loader for q in batch.qids]
    assert sorted(qids) == [101, 102, 103]


# -- missing_images (docs/tasks.md: every task accepts it) -----------------------------------------
def test_missing_images_skip_drops_and_counts_questions_without_an_image(tmp_path, vocab_file):
    cfg = _json_files(tmp_path, vocab_file)
    only1 = _img_db(tmp_path, "img_db/only1", keys=(1,), nboxes=(10,))
    cfg = dict(cfg, img_db={"train": [only1], "val": [only1]}, missing_images="skip")
    train = VQA2Builder("vqa2", cfg).build_dataset("train")
    assert train.qids == [1000] and train.num_dropped == 2  # 2000: no image; 2001: over max_txt_len
    val = VQA2Builder("vqa2", cfg).build_dataset("val")
    assert val.qids == [1000] and val.num_dropped == 2  # both questions of image 2
    with pytest.raises(ConfigError, match=r"missing_images must be one of \['error', 'skip'\]"):
        VQA2Builder("vqa2", dict(cfg, missing_images="ignore")).build_dataset("train")


def test_missing_images_is_a_vqa2_config_key(tmp_path):
    from villa_plugin.config.compose import build_config

    config = build_config(["config=projects/villa/demo.yaml", f"env.cache_dir={tmp_path}",
                           "dataset_config.vqa2.missing_images=skip"], load_plugins=False)
    assert config.dataset_config.vqa2.missing_images == "skip"


def test_input_spec_reports_vocabulary_targets_and_feature_width(tmp_path, vocab_file):
    cfg = _json_files(tmp_path, vocab_file)
    spec = VQA2Builder("vqa2", cfg).build_dataset("train").input_spec
    train = VQA2Builder("vqa2", cfg).build_dataset("train")
    top = max(max(train[i]["input_ids"]) for i in range(len(train)))
    assert (spec.vocab_size.value, spec.vocab_size.where) == (top + 1, "dataset_config.vqa2.vocab")
    assert spec.vocab_size.detail == f"{vocab_file}, 24 tokens; the highest id used is {top}"
    assert (spec.label_width.value, spec.label_width.where, spec.label_width.detail) == (4, "dataset_config.vqa2.num_answers", "")
    assert spec.feature_dim.value == 2048 and spec.feature_dim.where == f"img_db {tmp_path / 'img_db/coco'}"
    derived = VQA2Builder("vqa2", dict(cfg, num_answers=None)).build_dataset("val").input_spec
    assert derived.label_width.value == 4 and derived.label_width.detail == "null: the answers of ans2label.json"
    with pytest.raises(ConfigError, match="num_answers must be an integer or null"):
        VQA2Builder("vqa2", dict(cfg, num_answers="4")).build_dataset("val")


def test_input_spec_of_txt_dbs_reads_meta_v_range(tmp_path):
    img = _img_db(tmp_path, keys=(1,), nboxes=(10,))
    meta = {"bert": "bert-base-cased", "CLS": 101, "SEP": 102, "v_range": [999, 28996]}
    write_txt_db(str(tmp_path / "x.db"), [("1", {"input_ids": [5], "img_fname": _key(1)})], meta)
    spec = VQA2Builder("vqa2", _base(tmp_path, txt_db={"val": ["x.db"]}, img_db={"val": [img]})).build_dataset("val").input_spec
    assert spec.vocab_size.value == 28996 and spec.vocab_size.where == str(tmp_path / "x.db" / "meta.json")
    img2 = _img_db(tmp_path, "img_db/narrow", keys=(1,), nboxes=(10,))
    write_img_db(str(tmp_path / "img_db/wide"), [(_key(1), region_record(10, CONF10, dim=1024))])
    with pytest.raises(DataError, match=r"img_db/narrow holds 2048-d features but .*img_db/wide holds 1024-d"):
        VQA2Builder("vqa2", _base(tmp_path, txt_db={"val": ["x.db", "x.db"]},
                                  img_db={"val": [img2, "img_db/wide"]})).build_dataset("val")
