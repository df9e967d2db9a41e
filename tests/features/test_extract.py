"""``mmf_extract`` end to end on generated images: UNITER img_db and LXMERT TSV outputs read back,
resume, kill -9 then re-run == an uninterrupted run, determinism, YAML settings."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from villa_plugin.common.errors import ConfigError
from villa_plugin.datasets.features import ImgFeatDB, decode_record
from villa_plugin.features import cli
from villa_plugin.features.writers import read_tsv

REPO = Path(__file__).resolve().parents[2]
GRID = ["--backend", "grid", "--weights", "random", "--option", "image_size=32", "--num_workers", "0"]


def _images(folder: Path, n: int, size=(40, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = size[0] + 3 * (i % 4), size[1]
        arr = (np.random.RandomState(i).rand(h, w, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i}.png")
    return folder


def _records(db_path) -> dict:
    env = lmdb.open(str(db_path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): v for k, v in txn.cursor()}
    env.close()
    return out


def test_img_db_and_tsv_outputs_read_back(tmp_path):
    src = _images(tmp_path / "imgs", 3)
    out = tmp_path / "img_db" / "mine"
    assert cli.main(["--images", str(src), "--output", str(out), "--format", "both", *GRID,
                     "--option", "grid_size=4"]) == 0
    db = ImgFeatDB(str(out))  # UNITER's defaults: conf_th 0.2, min_bb 10, max_bb 100
    assert sorted(db.keys()) == ["img_0.npz", "img_1.npz", "img_2.npz"]
    feat, pos = db["img_1.npz"]
    assert feat.shape == (16, 2048) and pos.shape == (16, 7)
    assert json.loads((out / "nbb_th0.2_max100_min10.json").read_text()) == {f"img_{i}.npz": 16 for i in range(3)}
    record = db.dump("img_1.npz")
    assert record["soft_labels"].shape == (16, 1601) and record["conf"].shape == (16, 1)
    np.testing.assert_allclose(pos[5].numpy(), [0.25, 0.25, 0.5, 0.5, 0.25, 0.25, 0.0625])
    rows = {r["img_id"]: r for r in read_tsv(str(out / "obj36.tsv"))}
    assert sorted(rows) == ["img_0", "img_1", "img_2"]
    row = rows["img_1"]
    assert (row["img_w"], row["img_h"], row["num_boxes"]) == (43, 30, 16)
    np.testing.assert_allclose(row["boxes"][5], [43 / 4, 30 / 4, 43 / 2, 30 / 2], rtol=1e-6)
    np.testing.assert_allclose(row["features"], feat.numpy(), rtol=2e-3, atol=1e-3)  # TSV fp32, db fp16
    assert (row["objects_id"] == -1).all()


def test_rerun_skips_what_is_done_and_adds_new_images(tmp_path):
    src = _images(tmp_path / "imgs", 3)
    out = tmp_path / "db"
    assert cli.main(["--images", str(src), "--output", str(out), *GRID]) == 0
    before = _records(out / "feat_th0.2_max100_min10")
    _images(tmp_path / "more", 1, size=(50, 20))
    os.rename(tmp_path / "more" / "img_0.png", src / "new.png")
    assert cli.main(["--images", str(src), "--output", str(out), *GRID]) == 0
    report = json.loads((out / "extract_report.json").read_text())
    assert (report["already_done"], report["extracted"]) == (3, 1)
    after = _records(out / "feat_th0.2_max100_min10")
    assert all(after[k] == v for k, v in before.items() if k != "__keys__")
    assert json.loads(after["__keys__"]) == ["img_0.npz", "img_1.npz", "img_2.npz", "new.npz"]


def _extract_args(src, out, batch_size):
    return ["--images", str(src), "--output", str(out),
            "--format", "both", "--batch_size", str(batch_size), "--log_interval", "0", "--backend", "grid",
            "--weights", "random", "--option", "image_size=64", "--num_workers", "1"]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path):
    src = _images(tmp_path / "imgs", 16)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert cli.main(_extract_args(src, full, 2)) == 0

    cmd = [sys.executable, "-m", "villa_plugin.features", *_extract_args(src, crashed, 2)]
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # progress lines come after each committed batch
        if line.startswith("mmf_extract: ") and int(line.split()[1].split("/")[0]) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = [k for k in _records(crashed / "feat_th0.2_max100_min10") if k != "__keys__"]
    assert 4 <= len(partial) < 16  # killed mid-run, after some commits

    assert cli.main(_extract_args(src, crashed, 2)) == 0
    report = json.loads((crashed / "extract_report.json").read_text())
    assert report["already_done"] == len(partial) and report["extracted"] == 16 - len(partial)
    a, b = _records(full / "feat_th0.2_max100_min10"), _records(crashed / "feat_th0.2_max100_min10")
    assert a == b and len(a) == 17  # 16 images, each once, + __keys__
    for name in ("nbb_th0.2_max100_min10.json", "obj36.tsv"):
        assert (full / name).read_bytes() == (crashed / name).read_bytes()


def test_features_do_not_depend_on_the_batch(tmp_path):
    src = _images(tmp_path / "imgs", 5)
    for bs in (1, 3):
        assert cli.main(["--images", str(src), "--output", str(tmp_path / f"bs{bs}"), "--batch_size", str(bs),
                         *GRID]) == 0
    one, three = (_records(tmp_path / f"bs{bs}" / "feat_th0.2_max100_min10") for bs in (1, 3))
    assert one.keys() == three.keys()
    for key in one:
        if key != "__keys__":
            x, y = decode_record(one[key]), decode_record(three[key])
            np.testing.assert_allclose(x["features"].astype(np.float32), y["features"].astype(np.float32),
                                       rtol=2e-3, atol=1e-4)  # batched convolutions: last-bit differences


def test_yaml_settings_and_flags_override_them(tmp_path):
    src = _images(tmp_path / "imgs", 2)
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(f"backend: grid\nweights: random\nimages: [{src}]\nconf_th: -1\nnum_bb: 4\n"
                   f"num_workers: 0\nbackend_options: {{image_size: 32, grid_size: 3}}\n")
    out = tmp_path / "db"
    assert cli.main(["--config", str(cfg), "--output", str(out), "--option", "grid_size=2"]) == 0
    db = ImgFeatDB(str(out), conf_th=-1, num_bb=4)
    assert db["img_0.npz"][0].shape == (4, 2048)  # grid 2x2 from the flag, fixed-count naming feat_numbb4
    cfg.write_text("backend: grid\nweigths: random\n")
    with pytest.raises(ConfigError, match="weigths"):
        from villa_plugin.features.config import load_yaml

        load_yaml(str(cfg))
    assert cli.main(["--images", str(src), "--output", str(out), "--backend", "nope", "--weights", "random"]) == 1


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--images", "--output", "--backend", "--weights", "--format", "--conf_th", "--min_bb", "--max_bb",
                 "--batch_size", "--num_workers", "--device", "--key_format", "--config", "butd_r101"):
        assert flag in text


def test_a_backend_failure_on_one_image_skips_only_that_image(tmp_path, monkeypatch):
    from villa_plugin.features import extract

    src = _images(tmp_path / "imgs", 3)
    Image.new("RGB", (40, 30), "white").save(src / "poison.png")
    real_build = extract.build_backend

    def build(name, options, weights):
        backend = real_build(name, options, weights)
        inner = backend.extract

        def failing(inputs):
            if any(float(x.mean()) > 2.0 for x in inputs):  # the white image, normalised
                raise RuntimeError("CUDA out of memory (simulated)")
            return inner(inputs)

        backend.extract = failing
        return backend

    monkeypatch.setattr(extract, "build_backend", build)
    assert cli.main(["--images", str(src), "--output", str(tmp_path / "db"), "--batch_size", "4", *GRID]) == 0
    report = json.loads((tmp_path / "db" / "extract_report.json").read_text())
    assert report["extracted"] == 3 and report["counts"] == {"skipped:backend-error": 1}
    assert "out of memory" in report["skipped"][str(src / "poison.png")]


def test_a_missing_cuda_device_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    src = _images(tmp_path / "imgs", 1)
    assert cli.main(["--images", str(src), "--output", str(tmp_path / "db"), *GRID, "--device", "cuda"]) == 1
    assert "--device cuda: no such CUDA device" in capsys.readouterr().err
