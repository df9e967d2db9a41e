"""The bad-image matrix: each kind is converted or skipped with a reason, never fatal (one test each),
and input listing from a folder, a glob or a list file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from villa_plugin.common.errors import DataError
from villa_plugin.features import cli
from villa_plugin.features.images import decode_image, make_items

MAX_PIXELS, MAX_SIDE = 100_000, 256


def _rgb(w=40, h=30, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _decode(path):
    return decode_image(str(path), MAX_PIXELS, MAX_SIDE)


def test_unreadable_file_is_skipped(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"this is not a jpeg")
    out = _decode(tmp_path / "x.jpg")
    assert out.image is None and out.skip_reason.startswith("unreadable")


def test_truncated_jpeg_is_skipped(tmp_path):
    _rgb(64, 64).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    out = _decode(tmp_path / "cut.jpg")
    assert out.image is None and out.skip_reason.startswith("truncated")


def test_cmyk_is_converted(tmp_path):
    _rgb().convert("CMYK").save(tmp_path / "c.jpg")
    out = _decode(tmp_path / "c.jpg")
    assert out.image.mode == "RGB" and out.conversions == ["cmyk"]


def test_grayscale_is_converted(tmp_path):
    _rgb().convert("L").save(tmp_path / "g.png")
    out = _decode(tmp_path / "g.png")
    assert out.image.mode == "RGB" and out.conversions == ["grayscale"]
    arr = np.asarray(out.image)
    assert np.array_equal(arr[..., 0], arr[..., 2])


def test_16_bit_is_scaled_to_8_bit(tmp_path):
    values = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = _decode(tmp_path / "d.png")
    assert out.image.mode == "RGB" and "16-bit" in out.conversions
    arr = np.asarray(out.image)[..., 0].astype(int)
    assert arr.max() == round(int(values.max()) * 255 / 65535) and arr.min() == 0


def test_exif_rotation_is_applied(tmp_path):
    img = _rgb(40, 20)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    out = _decode(tmp_path / "r.jpg")
    assert out.image.size == (20, 40) and out.original_size == (20, 40)
    assert out.conversions == ["exif-rotated"]


def test_huge_image_is_skipped_and_large_one_downscaled(tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "huge.png")  # 120k pixels > MAX_PIXELS
    out = _decode(tmp_path / "huge.png")
    assert out.image is None and out.skip_reason.startswith("huge")
    Image.new("RGB", (600, 100)).save(tmp_path / "wide.png")  # 60k pixels, longer side > MAX_SIDE
    out = _decode(tmp_path / "wide.png")
    assert out.image.size == (256, 43) and out.original_size == (600, 100) and out.conversions == ["downscaled"]


def test_bad_images_never_stop_a_run_and_are_reported(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    _rgb(seed=1).save(src / "good.jpg")
    _rgb(seed=2).convert("CMYK").save(src / "cmyk.jpg")
    _rgb(seed=3).convert("L").save(src / "gray.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    Image.new("RGB", (400, 300)).save(src / "huge.png")
    out = tmp_path / "db"
    code = cli.main(["--images", str(src), "--output", str(out), "--backend", "grid", "--weights", "random",
                     "--option", "image_size=32", "--num_workers", "0", "--max_pixels", str(MAX_PIXELS)])
    assert code == 0
    report = json.loads((out / "extract_report.json").read_text())
    assert report["extracted"] == 3 and report["images_found"] == 5
    assert sorted(report["skipped"]) == sorted([str(src / "broken.jpg"), str(src / "huge.png")])
    assert report["counts"] == {"converted:cmyk": 1, "converted:grayscale": 1, "skipped:huge": 1,
                                "skipped:unreadable": 1}


def test_folder_glob_and_list_file_inputs(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for rel in ("a/one.jpg", "a/sub/two.png", "a/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    assert [i.key for i in make_items([str(tmp_path / "a")], "{stem}.npz")] == ["one.npz", "two.npz"]
    assert [i.key for i in make_items([str(tmp_path / "a" / "**" / "*.png")], "{stem}")] == ["two"]
    (tmp_path / "list.txt").write_text("# images\na/one.jpg\n\na/sub/two.png\n")
    items = make_items([str(tmp_path / "list.txt")], "{relstem}.npz")
    assert [i.key for i in items] == ["a_one.npz", "a_sub_two.npz"]
    (tmp_path / "a" / "two.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="relstem"):
        make_items([str(tmp_path / "a")], "{stem}.npz")
