"""img_db integrity: a half-copied LMDB is refused when opened (not a SIGBUS on read), and a damaged
record of either encoding we write is named, in the main process and through DataLoader workers."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from datasets_testlib import region_record
from villa_plugin.common.errors import DataError
from villa_plugin.datasets.features import ImgFeatDB, db_dirname, write_img_db

CONFS = [0.9, 0.8, 0.7, 0.5, 0.3, 0.25, 0.1, 0.05, 0.01, 0.01, 0.01, 0.01]


def _write(tmp_path, compressed, n_images=40):
    records = ((f"img_{i}.npz", region_record(12, CONFS, seed=i)) for i in range(n_images))
    return write_img_db(str(tmp_path / "coco"), records, compressed=compressed, conf_th=0.2, max_bb=100, min_bb=4)


def test_half_copied_lmdb_is_a_data_error_at_open_naming_sizes_and_fix(tmp_path):
    db_path = _write(tmp_path, compressed=False)
    data = os.path.join(db_path, "data.mdb")
    full = os.path.getsize(data)
    os.truncate(data, full // 2)
    # in a subprocess: before the check, reading the missing half killed the process with SIGBUS
    script = textwrap.dedent(f"""
        import sys
        from villa_plugin.common.errors import DataError
        from villa_plugin.datasets.features import ImgFeatDB
        try:
            db = ImgFeatDB({str(tmp_path / "coco")!r}, conf_th=0.2, max_bb=100, min_bb=4)
            for key in db.keys():
                db[key]
        except DataError as err:
            print(err)
            sys.exit(3)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])
    message = done.stdout
    assert f"{data} is truncated" in message
    assert f"need {full} bytes but the file holds {full // 2}" in message
    assert f"Copy the whole directory {db_path} again" in message


@pytest.mark.parametrize("compressed", [False, True])
def test_a_flipped_byte_in_any_written_record_is_a_data_error(tmp_path, compressed):
    db_path = _write(tmp_path, compressed=compressed, n_images=1)
    data = os.path.join(db_path, "data.mdb")
    raw = bytearray(open(data, "rb").read())
    feature_bytes = region_record(12, CONFS, seed=0)["features"][:6].astype("float16").tobytes()
    # the first stored feature row (fp16); compressed records are deflated: flip inside the zip data
    at = raw.find(feature_bytes[:64]) if not compressed else raw.find(b"features.npy") + 400
    assert at > 0
    raw[at + 10] ^= 0xFF
    open(data, "wb").write(bytes(raw))
    db = ImgFeatDB(str(tmp_path / "coco"), conf_th=0.2, max_bb=100, min_bb=4, compressed=compressed)
    with pytest.raises(DataError, match=r'Corrupt record "img_0.npz" in img_db .*(checksum|CRC|Error)') as caught:
        db["img_0.npz"]
    assert "re-download" not in str(caught.value)


def test_records_round_trip_and_keep_no_checksum_key(tmp_path):
    _write(tmp_path, compressed=False, n_images=2)
    db = ImgFeatDB(str(tmp_path / "coco"), conf_th=0.2, max_bb=100, min_bb=4)
    assert sorted(db.dump("img_1.npz")) == ["conf", "features", "norm_bb"]
    assert db["img_1.npz"][0].shape == (6, 2048)


def test_a_record_is_checked_once_per_process_and_a_failed_one_every_time(tmp_path, monkeypatch):
    from villa_plugin.datasets import features
    _write(tmp_path, compressed=False, n_images=2)
    db = ImgFeatDB(str(tmp_path / "coco"), conf_th=0.2, max_bb=100, min_bb=4)
    checked = []
    real = features.arrays_crc32
    monkeypatch.setattr(features, "arrays_crc32", lambda arrays: checked.append(1) or real(arrays))
    first = db["img_0.npz"][0]
    assert torch.equal(db.regions("img_0.npz")[0].float(), first) and len(checked) == 1
    db["img_1.npz"]
    assert len(checked) == 2
    # a record that fails its check is not remembered: it fails again on the next read
    monkeypatch.setattr(features, "arrays_crc32", lambda arrays: -1)
    db2 = ImgFeatDB(str(tmp_path / "coco"), conf_th=0.2, max_bb=100, min_bb=4)
    for _ in range(2):
        with pytest.raises(DataError, match="checksum"):
            db2["img_0.npz"]
