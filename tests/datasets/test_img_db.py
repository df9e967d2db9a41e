"""img_db reader/writer: UNITER's encodings, the nbb rule, and every bad-input error."""
import io
import json
import os
import pickle

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch

from datasets_testlib import region_record
from villa_plugin.common.errors import DataError
from villa_plugin.datasets.features import (
    ImgFeatDB, compute_num_bb, db_dirname, decode_record, nbb_json_name, write_img_db,
)

CONFS = [0.9, 0.8, 0.7, 0.5, 0.3, 0.25, 0.1, 0.05, 0.01, 0.01, 0.01, 0.01]  # 6 above 0.2


def _write_raw_lmdb(path, items):
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k.encode(), v)
    env.close()


def _uniter_style_value(rec, compressed):
    """Encode exactly as UNITER's convert_imgdir.py does (msgpack_numpy / np.savez_compressed)."""
    dump = {k: v.astype(np.float16) for k, v in rec.items()}
    if compressed:
        buf = io.BytesIO()
        np.savez_compressed(buf, **dump)
        return buf.getvalue()
    return msgpack.packb(dump, default=msgpack_numpy.encode, use_bin_type=True)


@pytest.mark.parametrize("compressed", [False, True])
def test_reads_uniter_written_records_and_builds_7d_pos(tmp_path, compressed):
    rec = region_record(12, CONFS, soft_labels=True)
    db_dir = tmp_path / "coco" / db_dirname(0.2, 100, 4, 36, compressed)
    _write_raw_lmdb(db_dir, {"img_a.npz": _uniter_style_value(rec, compressed),
                             "__keys__": json.dumps(["img_a.npz"]).encode()})
    db = ImgFeatDB(tmp_path / "coco", conf_th=0.2, max_bb=100, min_bb=4, compressed=compressed)
    feat, pos = db["img_a.npz"]
    assert feat.dtype == torch.float32 and feat.shape == (6, 2048)  # recomputed: 6 boxes with conf > 0.2
    np.testing.assert_allclose(feat.numpy(), rec["features"][:6].astype(np.float16).astype(np.float32))
    bb = rec["norm_bb"][:6].astype(np.float16).astype(np.float32)
    assert pos.shape == (6, 7)
    np.testing.assert_allclose(pos[:, :6].numpy(), bb)
    np.testing.assert_allclose(pos[:, 6].numpy(), bb[:, 4] * bb[:, 5], rtol=1e-6)
    assert db.keys() == ["img_a.npz"]
    dump = db.dump("img_a.npz")
    assert dump["soft_labels"].shape == (6, 5) and dump["conf"].dtype == np.float32


def test_nbb_rule_clamps():
    conf = np.asarray(CONFS)
    assert compute_num_bb(conf, 0.2, 10, 100) == 10  # 6 above -> min_bb
    assert compute_num_bb(conf, 0.2, 2, 100) == 6
    assert compute_num_bb(conf, 0.2, 2, 4) == 4  # max_bb
    assert compute_num_bb(conf, 0.0, 2, 100) == 12


@pytest.mark.parametrize("compressed", [False, True])
def test_writer_round_trip_with_side_json(tmp_path, compressed):
    recs = [("a.npz", region_record(12, CONFS, seed=1)), ("b.npz", region_record(3, [0.9, 0.8, 0.7], seed=2))]
    path = write_img_db(str(tmp_path), recs, compressed=compressed, conf_th=0.2, max_bb=5, min_bb=2)
    assert os.path.basename(path) == db_dirname(0.2, 5, 2, 36, compressed)
    side = json.loads((tmp_path / nbb_json_name(0.2, 5, 2)).read_text())
    assert side == {"a.npz": 5, "b.npz": 3}
    db = ImgFeatDB(str(tmp_path), conf_th=0.2, max_bb=5, min_bb=2, compressed=compressed)
    assert sorted(db.keys()) == ["a.npz", "b.npz"]
    assert db.nbb("a.npz") == 5 and db["a.npz"][0].shape == (5, 2048)
    assert db["b.npz"][1].shape == (3, 7)


def test_side_json_wins_over_conf(tmp_path):
    write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))], conf_th=0.2, max_bb=100, min_bb=2)
    # the stored rows are cut to 6; a side json saying 4 must be obeyed
    (tmp_path / nbb_json_name(0.2, 100, 2)).write_text(json.dumps({"a.npz": 4}))
    db = ImgFeatDB(str(tmp_path), conf_th=0.2, max_bb=100, min_bb=2)
    assert db.nbb("a.npz") == 4 and db["a.npz"][0].shape[0] == 4
    os.remove(tmp_path / nbb_json_name(0.2, 100, 2))
    assert ImgFeatDB(str(tmp_path), conf_th=0.2, max_bb=100, min_bb=2).nbb("a.npz") == 6


def test_conf_th_minus_one_uses_num_bb(tmp_path):
    path = write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))], conf_th=-1, num_bb=8)
    assert os.path.basename(path) == "feat_numbb8"
    assert not any(n.startswith("nbb_") for n in os.listdir(tmp_path))
    db = ImgFeatDB(str(tmp_path), conf_th=-1, num_bb=8)
    assert db.nbb("a.npz") == 8 and db["a.npz"][0].shape == (8, 2048)


def test_keep_all_dir_is_a_fallback_with_recomputed_nbb(tmp_path):
    path = write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))], keep_all=True)
    assert os.path.basename(path) == "all"
    db = ImgFeatDB(str(tmp_path), conf_th=0.2, max_bb=100, min_bb=3)
    assert db.db_path == path and db.nbb("a.npz") == 6


def test_other_compression_variant_is_found(tmp_path):
    write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))], compressed=True, min_bb=2)
    db = ImgFeatDB(str(tmp_path), min_bb=2, compressed=False)
    assert db.db_path.endswith("_compressed") and db["a.npz"][0].shape[0] == 6


def test_missing_dir_and_missing_lmdb_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.*download|nowhere.*convert"):
        ImgFeatDB(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"feat_th0.2_max100_min10.*convert_npz_dir_to_img_db"):
        ImgFeatDB(str(tmp_path / "empty"))


def test_missing_key_names_key_and_db(tmp_path):
    write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))], min_bb=2)
    db = ImgFeatDB(str(tmp_path), min_bb=2)
    assert "zzz.npz" not in db
    with pytest.raises(DataError, match=r'"zzz.npz".*feat_th0.2_max100_min2'):
        db["zzz.npz"]


@pytest.mark.parametrize("value", [b"\x00garbage", b"PK\x03\x04broken", msgpack.packb({"features": 1})])
def test_corrupt_record_names_key_and_db(tmp_path, value):
    db_dir = tmp_path / db_dirname(0.2, 100, 10, 36)
    _write_raw_lmdb(db_dir, {"bad.npz": value})
    db = ImgFeatDB(str(tmp_path))
    with pytest.raises(DataError, match=r'Corrupt record "bad.npz".*feat_th0.2'):
        db["bad.npz"]


def test_object_arrays_are_refused_not_unpickled(tmp_path):
    """msgpack_numpy would call pickle.loads on an object-dtype array; the reader must not."""
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = {"features": {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1],
                         b"data": pickle.dumps(np.array([Boom()], dtype=object))}}
    _write_raw_lmdb(tmp_path / db_dirname(0.2, 100, 10, 36), {"evil.npz": msgpack.packb(evil, use_bin_type=True)})
    with pytest.raises(DataError, match="refusing"):
        ImgFeatDB(str(tmp_path))["evil.npz"]
    with pytest.raises(ValueError):
        decode_record(msgpack.packb(evil, use_bin_type=True))


def test_zero_boxes_raise_and_few_boxes_are_counted(tmp_path, caplog):
    write_img_db(str(tmp_path), [("few.npz", region_record(3, [0.9, 0.1, 0.1])),
                                 ("none.npz", region_record(0, np.zeros((0,))))], min_bb=10)
    db = ImgFeatDB(str(tmp_path), min_bb=10)
    with caplog.at_level("WARNING"):
        assert db["few.npz"][0].shape[0] == 3  # VG-like image with fewer than min_bb boxes
        db["few.npz"]
    assert db.num_below_min == 1 and "few.npz" in caplog.text
    with pytest.raises(DataError, match=r'"none.npz".*zero boxes'):
        db.nbb("none.npz")


def test_reader_survives_pickling_and_reopens(tmp_path):
    write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))], min_bb=2)
    db = ImgFeatDB(str(tmp_path), min_bb=2)
    first = db["a.npz"][0]
    clone = pickle.loads(pickle.dumps(db))  # what a spawn worker gets
    assert clone.db._txn is None
    assert torch.equal(clone["a.npz"][0], first)


def test_writer_refuses_to_overwrite(tmp_path):
    write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))])
    with pytest.raises(DataError, match="already exists"):
        write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))])


def test_lmdb_get_copies_and_get_view_does_not(tmp_path):
    write_img_db(str(tmp_path), [("a.npz", region_record(12, CONFS))], min_bb=2)
    db = ImgFeatDB(str(tmp_path), min_bb=2)
    value, view = db.db.get("a.npz"), db.db.get_view("a.npz")
    assert type(value) is bytes and isinstance(view, memoryview) and view.readonly
    assert bytes(view) == value
    assert db.db.get("missing") is None and db.db.get_view("missing") is None
    rec = decode_record(view)
    assert rec["features"].base is not None and not np.shares_memory(rec["features"], np.frombuffer(view, np.uint8))
