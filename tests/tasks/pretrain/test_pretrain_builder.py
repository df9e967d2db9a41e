"""Pre-training builders: both sources, task views, masks per (seed, epoch, index), ITM negatives,
soft-label errors naming the db and the key, mix-ratio validation."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.task_mixture import TaskMixture
from villa_plugin.datasets.text import write_txt_db
from villa_plugin.registry import registry
from villa_plugin.tasks.pretrain.builder import caption_image_key
from villa_plugin.tasks.pretrain.dataset import check_mix
from villa_plugin.tasks.pretrain.demo import KEY_FORMAT, materialise_demo, paths


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The pre-training demo, materialised once for this module (a few seconds)."""
    cache = tmp_path_factory.mktemp("pretrain_cache")
    materialise_demo(str(cache / "demo" / "pretrain_v1"))
    return cache


def _builder(name, demo_cache, **cfg):
    base = {"demo": True, "demo_dir": str(demo_cache / "demo" / "pretrain_v1"), "tasks": ["itm", "mlm", "mrfr", "mrckl"],
            "mix_ratio": [2, 2, 1, 1], "max_txt_len": 60, "missing_images": "error"}
    return registry.get_builder_class(name)(name, dict(base, **cfg))


@pytest.mark.parametrize("name", ["pretrain_coco", "pretrain_vg", "pretrain_cc", "pretrain_sbu"])
def test_every_corpus_builds_a_task_mixture(name, demo_cache):
    mixture = _builder(name, demo_cache).build_dataset("val")
    assert isinstance(mixture, TaskMixture) and mixture.dataset_name == name
    assert mixture.mix_ratio == {"itm": 2.0, "mlm": 2.0, "mrfr": 1.0, "mrckl": 1.0}
    assert set(mixture.streams()) == {f"{t}_{name}" for t in ("itm", "mlm", "mrfr", "mrckl")}
    assert len(mixture) == 240


def test_txt_db_and_captions_json_give_the_same_examples(demo_cache):
    via_db = _builder("pretrain_coco", demo_cache, source="txt_db").build_dataset("val").views["mlm"].corpus
    via_json = _builder("pretrain_coco", demo_cache, source="captions_json").build_dataset("val").views["mlm"].corpus
    by_id_db = {str(i): (via_db.tokens(n), via_db.records.img_keys[n]) for n, i in enumerate(via_db.records.ids)}
    by_id_json = {str(i): (via_json.tokens(n), via_json.records.img_keys[n]) for n, i in enumerate(via_json.records.ids)}
    assert by_id_db == by_id_json and len(by_id_db) == 240
    assert via_db.specials == via_json.specials


def test_batches_per_task(demo_cache):
    views = _builder("pretrain_coco", demo_cache).build_dataset("train").views
    for task, keys in {"mlm": ["txt_labels"], "mrfr": ["img_masks", "img_mask_tgt", "feat_targets"],
                       "mrckl": ["label_targets"], "itm": ["targets", "ot_inputs"]}.items():
        batch = views[task].collate([views[task][i] for i in range(8)])
        assert batch["task"] == task and all(batch.get(k) is not None for k in keys)
        assert batch["dataset_name"] == "pretrain_coco" and batch["dataset_type"] == "train"
    assert views["mrckl"].collate([views["mrckl"][0]])["label_targets"].shape[-1] == 1601


def test_masks_are_a_function_of_seed_epoch_and_index(demo_cache):
    view = _builder("pretrain_coco", demo_cache).build_dataset("train").views["mlm"]
    view.set_epoch(5, 0)
    first = [view[i]["txt_labels"] for i in range(50)]
    assert [view[i]["txt_labels"] for i in range(50)] == first  # re-reading: the same masks
    view.set_epoch(5, 1)
    assert [view[i]["txt_labels"] for i in range(50)] != first  # a new epoch redraws them
    view.set_epoch(6, 0)
    assert [view[i]["txt_labels"] for i in range(50)] != first


def test_itm_negatives_are_other_images_redrawn_per_epoch(demo_cache):
    view = _builder("pretrain_coco", demo_cache).build_dataset("train").views["itm"]
    corpus = view.corpus
    labels = {}
    for epoch in (0, 1):
        view.set_epoch(0, epoch)
        labels[epoch] = [view[i]["target"] for i in range(400)]
        for i in range(400):
            row = view[i]
            own = corpus.image(corpus.records.img_keys[i])["img_feat"]
            same = row["img_feat"].shape == own.shape and torch.equal(row["img_feat"], own)
            assert same == (row["target"] == 1)
    assert 0.4 < np.mean(labels[0]) < 0.6 and labels[0] != labels[1]


def _write_db_without_soft_labels(root):
    p = paths(str(root))
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    records = [(KEY_FORMAT.format(image_id=i), {"features": rng.random((5, 2048), dtype=np.float32),
                                                 "norm_bb": rng.random((5, 6), dtype=np.float32),
                                                 "conf": np.full((5, 1), 0.9, dtype=np.float32)}) for i in (1, 2)]
    db = write_img_db(str(root / "img_db"), records, compressed=False, min_bb=4)
    meta = {"bert": "t", "CLS": 2, "SEP": 3, "MASK": 4, "v_range": [5, 50]}
    write_txt_db(str(root / "txt.db"), [(str(i), {"input_ids": [7, 8, 9], "img_fname": KEY_FORMAT.format(image_id=i)})
                                          for i in (1, 2)], meta)
    return p, db


def test_mrc_on_an_img_db_without_soft_labels_names_the_db_and_the_key(tmp_path):
    _, db_path = _write_db_without_soft_labels(tmp_path)
    cfg = {"source": "txt_db", "data_dir": str(tmp_path), "txt_db": {"train": ["txt.db"]}, "img_db": {"train": ["img_db"]},
           "tasks": ["mlm", "mrckl"], "mix_ratio": [1, 1], "compressed": False, "min_bb": 4}
    builder = registry.get_builder_class("pretrain_vg")("pretrain_vg", cfg)
    with pytest.raises(DataError, match=r"task mrckl needs 'soft_labels'.*img_db .*img_db.*remove mrckl"):
        builder.build_dataset("train")
    cfg.update(tasks=["mlm", "itm"], mix_ratio=[1, 1])  # tasks without soft labels build fine
    assert set(registry.get_builder_class("pretrain_vg")("pretrain_vg", cfg).build_dataset("train").views) == {"mlm", "itm"}


def test_mix_validation():
    assert check_mix(["mlm", "itm"], [2, 1], "x") == [("mlm", 2.0), ("itm", 1.0)]
    for tasks, ratios, match in ((["mlm"], [1, 2], "one ratio per task"), (["mlm", "mlm"], [1, 1], "twice"),
                                 (["mlmm"], [1], "unknown"), (["mlm"], [0], "positive"), ([], [], "no pre-training")):
        with pytest.raises(ConfigError, match=match):
            check_mix(tasks, ratios, "dataset_config.pretrain_coco")


def test_caption_image_keys():
    image = {"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}
    assert caption_image_key("{file_stem_lower}.npz", 9, image, "w") == "coco_train2014_000000000009.npz"
    assert caption_image_key("x_{image_id:04d}.npz", 9, None, "w") == "x_0009.npz"
    with pytest.raises(DataError, match="not in the file's 'images'"):
        caption_image_key("{file_stem}.npz", 9, None, "w")
    with pytest.raises(ConfigError, match="cannot name image"):
        caption_image_key("{nope}.npz", 9, image, "w")
