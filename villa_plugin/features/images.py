"""Which images to extract, and decoding them robustly.

Decoding never raises for a bad image: :func:`decode_image` returns the RGB image plus the
conversions it made (``cmyk``, ``grayscale``, ``16-bit``, ``exif-rotated``, ...), or a skip reason
(``unreadable``, ``truncated``, ``huge``). The extraction run counts both and lists them in its report.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from villa_plugin.common.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped and reported, never half-decoded


@dataclass(frozen=True)
class ImageItem:
    key: str      # the img_db key (``--key_format``), e.g. ``img_1.npz``
    path: str


@dataclass
class Decoded:
    image: Optional[Image.Image]
    original_size: Tuple[int, int] = (0, 0)      # (width, height) after EXIF rotation, before downscaling
    conversions: List[str] = field(default_factory=list)
    skip_reason: Optional[str] = None


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def list_image_paths(source: str) -> Tuple[str, List[str]]:
    """``(root, sorted paths)`` of a folder (recursive, image extensions only), a glob or a list file.

    A list file holds one path per line (``#`` comments and blank lines ignored; relative paths are
    relative to the list file's folder). ``root`` is what keys' ``{relstem}`` is relative to.
    """
    if os.path.isdir(source):
        paths = [os.path.join(d, f) for d, _, files in os.walk(source) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
        return source, sorted(paths)
    if _is_glob(source):
        paths = [p for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise DataError(f"--images {source!r}: the glob matches no file.")
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]), sorted(paths)
    if os.path.isfile(source):
        base = os.path.dirname(os.path.abspath(source))
        with open(source, "r", encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
        paths = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
        return base, sorted(paths)
    raise DataError(f"--images {source!r} is not a folder, a glob or a list file (one image path per line).")


def make_items(sources: Sequence[str], key_format: str) -> List[ImageItem]:
    """One item per image path, keyed by ``key_format`` (fields ``stem``, ``name``, ``relstem``);
    duplicate keys are an error naming both files."""
    items, seen = [], {}
    for source in sources:
        root, paths = list_image_paths(source)
        for path in paths:
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
            stem = os.path.splitext(os.path.basename(path))[0]
            try:
                key = key_format.format(stem=stem, name=os.path.basename(path),
                                        relstem=os.path.splitext(rel)[0].replace(os.sep, "_"))
            except (KeyError, IndexError, ValueError) as err:
                raise DataError(f"--key_format {key_format!r}: {err}. Use the fields {{stem}}, {{name}}, "
                                f"{{relstem}}.") from err
            if key in seen:
                raise DataError(f"Two images get the key {key!r}: {seen[key]} and {path}. Rename one, or use "
                                f'--key_format "{{relstem}}.npz" (the path below the folder, / -> _).')
            seen[key] = path
            items.append(ImageItem(key, path))
    if not items:
        raise DataError(f"No images found in {', '.join(sources)} (extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    return sorted(items, key=lambda it: it.key)


def _to_rgb(image: Image.Image, conversions: List[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            top = 65535 if mode.startswith("I;16") else max(int(arr.max()), 1)
            arr = (arr.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
        conversions.append("16-bit")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "CMYK":
        conversions.append("cmyk")
    elif mode in ("L", "LA", "1"):
        conversions.append("grayscale")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        conversions.append("alpha")
    else:
        conversions.append(f"mode-{mode}")
    return image.convert("RGB")


def decode_image(path: str, max_pixels: int, max_side: int) -> Decoded:
    """RGB image (EXIF orientation applied, longer side at most ``max_side``) or a skip reason."""
    conversions: List[str] = []
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return Decoded(None, (width, height), skip_reason=f"huge: {width}x{height} pixels > --max_pixels {max_pixels}")
            if max(width, height) > max_side and image.format == "JPEG":
                image.draft("RGB", (max_side, max_side))  # decode at a reduced scale (cheap for big JPEGs)
            image.load()
            orientation = image.getexif().get(0x0112, 1)
            if orientation not in (1, None):
                image = ImageOps.exif_transpose(image)
                conversions.append("exif-rotated")
            image = _to_rgb(image, conversions)
    except Image.DecompressionBombError as err:
        return Decoded(None, skip_reason=f"huge: {err}")
    except UnidentifiedImageError:
        return Decoded(None, skip_reason="unreadable: not an image file PIL can identify")
    except Exception as err:  # any decoder failure: this image is skipped and reported, the run goes on
        text = str(err) or type(err).__name__
        reason = "truncated" if "truncated" in text.lower() or "broken data stream" in text.lower() else "unreadable"
        return Decoded(None, skip_reason=f"{reason}: {text}")
    # the size boxes refer to: the file's size, turned as the EXIF orientation turns the pixels
    original = (height, width) if "exif-rotated" in conversions and orientation in (5, 6, 7, 8) else (width, height)
    w, h = image.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        conversions.append("downscaled")
    return Decoded(image, original, conversions)


class ImageDataset:
    """``DataLoader`` dataset: decode + backend preprocessing in the workers; never raises per image."""

    def __init__(self, items: Sequence[ImageItem], preprocess: Callable, max_pixels: int, max_side: int):
        self.items, self.preprocess = list(items), preprocess
        self.max_pixels, self.max_side = max_pixels, max_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        decoded = decode_image(item.path, self.max_pixels, self.max_side)
        sample = {"key": item.key, "path": item.path, "conversions": decoded.conversions,
                  "skip_reason": decoded.skip_reason, "original_size": decoded.original_size, "input": None}
        if decoded.image is not None:
            try:
                sample["input"] = self.preprocess(decoded.image)
            except Exception as err:  # reported like a decoding failure, never fatal to the run
                sample["skip_reason"] = f"unreadable: preprocessing failed: {err}"
        return sample


def collate_samples(samples: List[dict]) -> List[dict]:
    """Keep samples as a list: images differ in size and some are skipped."""
    return samples
