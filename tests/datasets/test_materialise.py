"""Generated data (the bundled demos) is verified against its manifest on every use and rebuilt,
with a warning naming the damaged file, when a file was truncated, edited or removed."""
import logging
import os

import pytest

from villa_plugin.datasets import materialise as m

STAMP = {"name": "test data", "version": 1}


def _writer(calls):
    def write(root):
        calls.append(root)
        os.makedirs(os.path.join(root, "img_db"))
        with open(os.path.join(root, "img_db", "data.mdb"), "wb") as fh:
            fh.write(bytes(range(256)) * 64)
        with open(os.path.join(root, "vocab.txt"), "w") as fh:
            fh.write("[PAD]\n[UNK]\nred\n")
    return write


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_damaged_copy_is_logged_and_rebuilt(tmp_path, caplog, damage):
    root = str(tmp_path / "demo")
    calls = []
    m.materialise(root, STAMP, _writer(calls))
    good = open(os.path.join(root, "img_db", "data.mdb"), "rb").read()
    m.materialise(root, STAMP, _writer(calls))
    assert len(calls) == 1  # an intact copy is used as it is

    target = os.path.join(root, "img_db", "data.mdb")
    if damage == "truncate":
        os.truncate(target, len(good) // 2)
    elif damage == "flip":
        with open(target, "r+b") as fh:
            fh.seek(100)
            fh.write(b"\x00")
    else:
        os.remove(target)
    with caplog.at_level(logging.WARNING, logger="villa_plugin.datasets.materialise"):
        m.materialise(root, STAMP, _writer(calls))
    assert len(calls) == 2
    assert f"generated data in {root} is damaged (img_db/data.mdb" in caplog.text and "rebuilding it" in caplog.text
    assert "download" not in caplog.text
    assert open(target, "rb").read() == good
    assert m.is_current(root, STAMP)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_copy_without_manifest_is_rebuilt(tmp_path):
    root = str(tmp_path / "demo")
    calls = []
    m.materialise(root, STAMP, _writer(calls))
    os.remove(os.path.join(root, m.MANIFEST))
    assert not m.is_current(root, STAMP)
    m.materialise(root, STAMP, _writer(calls))
    assert len(calls) == 2 and m.is_current(root, STAMP)


def test_cache_dir_under_a_regular_file_is_a_data_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception) as caught:
        m.materialise(str(tmp_path / "file" / "demo"), STAMP, _writer([]))
    assert type(caught.value).__name__ == "DataError"
    assert f"Cannot create the generated data directory {tmp_path / 'file' / 'demo'}" in str(caught.value)
    assert "env.cache_dir" in str(caught.value)


def test_half_copied_vqa_demo_img_db_is_rebuilt(tmp_path, monkeypatch, caplog):
    from villa_plugin.tasks.vqa import demo
    from villa_plugin.datasets.features import ImgFeatDB

    monkeypatch.setattr(demo, "SPLITS", {"train": 80, "val": 16, "test": 16})
    paths = demo.materialise_demo(str(tmp_path / "vqa_v1"))
    img_dir = paths["splits"]["train"]["img_db"]
    data = os.path.join(img_dir, "feat_th0.2_max100_min10_compressed", "data.mdb")
    os.truncate(data, os.path.getsize(data) // 2)
    with caplog.at_level(logging.WARNING, logger="villa_plugin.datasets.materialise"):
        assert demo.materialise_demo(str(tmp_path / "vqa_v1")) == paths
    assert "img_db/demo_train/feat_th0.2_max100_min10_compressed/data.mdb has" in caplog.text
    db = ImgFeatDB(img_dir, conf_th=0.2, max_bb=100, min_bb=10, compressed=True)
    assert all(db[key][0].shape[1] == 2048 for key in db.keys())
