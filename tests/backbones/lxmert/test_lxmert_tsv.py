"""LXMERT obj36 TSV: exact dtypes, random access, box normalisation, clear errors on bad lines."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from villa_plugin.backbones.lxmert.tsv import (
    FIELDNAMES,
    ObjTsvFeatures,
    encode_row,
    iter_obj_tsv,
    normalise_boxes,
    write_obj_tsv,
)
from villa_plugin.common.errors import DataError

N = 36


def _record(img_id, seed, h=480, w=640, dim=2048):
    rng = np.random.default_rng(seed)
    x1y1 = rng.uniform(0, 0.5, (N, 2)) * [w, h]
    x2y2 = x1y1 + rng.uniform(0, 0.5, (N, 2)) * [w, h]
    return {
        "img_id": img_id, "img_h": h, "img_w": w,
        "objects_id": rng.integers(0, 1600, N), "objects_conf": rng.uniform(0, 1, N).astype(np.float32),
        "attrs_id": rng.integers(0, 400, N), "attrs_conf": rng.uniform(0, 1, N).astype(np.float32),
        "num_boxes": N, "boxes": np.concatenate([x1y1, x2y2], 1).astype(np.float32),
        "features": np.maximum(rng.normal(size=(N, dim)), 0).astype(np.float32),
    }


@pytest.fixture
def tsv(tmp_path):
    records = [_record("COCO_val2014_000000000042", 0), _record("2375429", 1, h=300, w=200),
               _record("train-10171-0-img0", 2)]
    path = write_obj_tsv(str(tmp_path / "val2014_obj36.tsv"), records)
    return path, records


def test_columns_decode_with_the_exact_dtypes(tsv):
    path, records = tsv
    decoded = list(iter_obj_tsv(path))
    assert [d["img_id"] for d in decoded] == [r["img_id"] for r in records]
    for got, want in zip(decoded, records):
        assert (got["img_h"], got["img_w"], got["num_boxes"]) == (want["img_h"], want["img_w"], N)
        for key, dtype, shape in [("objects_id", np.int64, (N,)), ("objects_conf", np.float32, (N,)),
                                  ("attrs_id", np.int64, (N,)), ("attrs_conf", np.float32, (N,)),
                                  ("boxes", np.float32, (N, 4)), ("features", np.float32, (N, 2048))]:
            assert got[key].dtype == dtype and got[key].shape == shape, key
            assert np.array_equal(got[key], np.asarray(want[key], dtype=dtype)), key
    assert len(list(iter_obj_tsv(path, topk=2))) == 2


def test_random_access_gives_fp32_features_and_normalised_boxes(tsv):
    path, records = tsv
    store = ObjTsvFeatures(path)
    assert len(store) == 3 and "2375429" in store and store.keys()[0] == "COCO_val2014_000000000042"
    feats, boxes = store["2375429"]
    want = records[1]
    assert feats.dtype == torch.float32 and torch.equal(feats, torch.from_numpy(want["features"]))
    expected = want["boxes"] / np.array([200, 300, 200, 300], dtype=np.float32)
    assert boxes.shape == (N, 4) and torch.equal(boxes, torch.from_numpy(expected))
    assert 0 <= boxes.min() and boxes.max() <= 1
    with pytest.raises(DataError, match="'missing'.*3 images"):
        store["missing"]


def test_several_files_and_duplicates(tmp_path, tsv):
    path, _ = tsv
    other = write_obj_tsv(str(tmp_path / "b.tsv"), [_record("b1", 5)])
    assert len(ObjTsvFeatures([path, other])) == 4
    dup = write_obj_tsv(str(tmp_path / "dup.tsv"), [_record("2375429", 6)])
    with pytest.raises(DataError, match="appears twice.*line 2.*dup.tsv line 1"):
        ObjTsvFeatures([path, dup])


def _corrupt(tmp_path, **changes):
    row = encode_row(_record("bad", 3, dim=8)).split("\t")
    for key, value in changes.items():
        row[FIELDNAMES.index(key)] = value
    path = tmp_path / "bad.tsv"
    path.write_text("\t".join(row) + "\n", encoding="ascii")
    return str(path)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"features": "not base64!"}, "column features is not valid base64"),
        ({"num_boxes": "35"}, "column objects_id has 36 int64 values, expected num_boxes × 1 = 35"),
        ({"img_h": "4.5"}, "img_h must be a decimal integer"),
        ({"boxes": base64.b64encode(np.zeros(10, np.float32).tobytes()).decode()}, "column boxes has 10"),
    ],
)
def test_malformed_lines_name_file_line_image_and_column(tmp_path, changes, message):
    path = _corrupt(tmp_path, **changes)
    with pytest.raises(DataError, match=message) as err:
        list(iter_obj_tsv(path, feature_dim=8))
    assert "bad.tsv line 1" in str(err.value) and "'bad'" in str(err.value)


def test_wrong_feature_size_and_column_count(tmp_path):
    path = _corrupt(tmp_path)
    with pytest.raises(DataError, match="features are 8-d, expected 2048"):
        list(iter_obj_tsv(path))
    short = tmp_path / "short.tsv"
    short.write_text("a\t1\t2\n", encoding="ascii")
    with pytest.raises(DataError, match="expected 10 tab-separated columns"):
        list(iter_obj_tsv(str(short)))
    with pytest.raises(DataError, match="not found"):
        ObjTsvFeatures(str(tmp_path / "nope.tsv"))


def test_boxes_outside_the_image_are_an_error():
    boxes = np.array([[0, 0, 640, 480]], dtype=np.float32)
    assert np.allclose(normalise_boxes(boxes, 480, 640), [[0, 0, 1, 1]])
    with pytest.raises(DataError, match="swapped"):
        normalise_boxes(boxes, 640, 480)


def test_tsv_converts_to_the_img_db_the_task_builders_read(tsv, tmp_path):
    from villa_plugin.backbones.lxmert.tsv import tsv_to_img_db
    from villa_plugin.datasets.features import ImgFeatDB

    path, records = tsv
    tsv_to_img_db([path], str(tmp_path / "img_db"), key_format="{img_id}.npz")
    db = ImgFeatDB(str(tmp_path / "img_db"), conf_th=-1, max_bb=36, min_bb=36, num_bb=36)
    record = records[1]
    feat, pos = db["2375429.npz"]
    assert feat.shape == (N, 2048) and pos.shape == (N, 7)
    expected = torch.from_numpy(record["features"]).half().float()  # the img_db stores fp16
    assert torch.equal(feat.float(), expected)
    boxes = torch.from_numpy(record["boxes"] / np.array([200, 300, 200, 300], dtype=np.float32))
    assert torch.allclose(pos[:, :4].float(), boxes, atol=1e-3)  # LXMERT reads these 4 columns
