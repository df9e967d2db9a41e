"""LXMERT's BUTD "obj36" region features: the TSV files of the official repo, read directly (lxmert.md §5).

One image per line, tab-separated, no header, columns ``img_id, img_h, img_w, objects_id,
objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features``. ``img_id`` is a string,
``img_h`` / ``img_w`` / ``num_boxes`` decimal ints; the rest are base64 of raw little-endian numpy
bytes: ``objects_id`` / ``attrs_id`` int64 [N], ``objects_conf`` / ``attrs_conf`` float32 [N],
``boxes`` float32 [N, 4] (x1, y1, x2, y2 in original-image pixels), ``features`` float32 [N, 2048].

Why a reader and not a conversion to UNITER's img_db: the img_db stores fp16 (its writer's rule),
which would round the fp32 features the official LXMERT runs use; reading the TSV keeps them exact
and needs no conversion step. :class:`ObjTsvFeatures` indexes the byte offset of every line once
(one pass, no features kept in memory) and decodes a line on access, so 20 GB files do not have to
fit in RAM (the official loader reads everything into memory).
"""
from __future__ import annotations

import base64
import binascii
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from villa_plugin.common.errors import DataError

FIELDNAMES = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
)
INT_FIELDS = ("img_h", "img_w", "num_boxes")
# (column, dtype, per-box shape); -1: the feature size, inferred or checked against feature_dim
ARRAY_FIELDS = (
    ("objects_id", np.dtype("<i8"), ()),
    ("objects_conf", np.dtype("<f4"), ()),
    ("attrs_id", np.dtype("<i8"), ()),
    ("attrs_conf", np.dtype("<f4"), ()),
    ("boxes", np.dtype("<f4"), (4,)),
    ("features", np.dtype("<f4"), (-1,)),
)
BOX_TOLERANCE = 1e-5  # the reference asserts normalised boxes within [-1e-5, 1 + 1e-5]
FEATURE_DIM = 2048


# ----------------------------------------------------------------------------------------------
# One line
# ----------------------------------------------------------------------------------------------
def decode_row(line: str, source: str = "<tsv>", line_no: int = 0, feature_dim: Optional[int] = FEATURE_DIM) -> Dict[str, Any]:
    """Decode one TSV line into ``{img_id: str, img_h/img_w/num_boxes: int, <array columns>: ndarray}``.

    Arrays are read-only numpy views with the exact dtypes above. A malformed line is a DataError
    naming the file, the line number, the image and the column.
    """
    fields = line.rstrip("\r\n").split("\t")
    where = f"{source} line {line_no}"
    if len(fields) != len(FIELDNAMES):
        raise DataError(
            f"{where}: expected {len(FIELDNAMES)} tab-separated columns ({', '.join(FIELDNAMES)}), got "
            f"{len(fields)}. Is this an LXMERT obj36 TSV?"
        )
    item: Dict[str, Any] = dict(zip(FIELDNAMES, fields))
    where = f"{where} (img_id {item['img_id']!r})"
    for key in INT_FIELDS:
        try:
            item[key] = int(item[key])
        except ValueError:
            raise DataError(f"{where}: column {key} must be a decimal integer, got {item[key][:20]!r}.") from None
    boxes = item["num_boxes"]
    for key, dtype, shape in ARRAY_FIELDS:
        try:
            raw = base64.b64decode(item[key], validate=True)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"{where}: column {key} is not valid base64 ({err}).") from None
        array = np.frombuffer(raw, dtype=dtype)
        per_box = int(np.prod(shape)) if shape and shape[0] != -1 else 1
        if shape == (-1,):
            if boxes == 0 or array.size % boxes:
                raise DataError(f"{where}: column features has {array.size} values for num_boxes={boxes}.")
            per_box = array.size // boxes
            if feature_dim is not None and per_box != feature_dim:
                raise DataError(f"{where}: features are {per_box}-d, expected {feature_dim} (BUTD pool5).")
            shape = (per_box,)
        if array.size != boxes * per_box:
            raise DataError(
                f"{where}: column {key} has {array.size} {dtype.name} values, expected num_boxes × {per_box} = "
                f"{boxes * per_box}."
            )
        array = array.reshape((boxes,) + tuple(shape))
        array.setflags(write=False)
        item[key] = array
    return item


def encode_row(record: Mapping[str, Any]) -> str:
    """One TSV line (no newline) for ``record`` (the columns of :data:`FIELDNAMES`; arrays are cast to
    the exact dtypes). The inverse of :func:`decode_row`."""
    out = []
    for key in FIELDNAMES:
        value = record[key]
        dtype = next((d for name, d, _ in ARRAY_FIELDS if name == key), None)
        if dtype is None:
            text = str(value)
            if "\t" in text or "\n" in text:
                raise ValueError(f"column {key} must not contain tabs or newlines: {text!r}")
            out.append(text)
        else:
            out.append(base64.b64encode(np.ascontiguousarray(value, dtype=dtype).tobytes()).decode("ascii"))
    return "\t".join(out)


def write_obj_tsv(path: str, records: Iterable[Mapping[str, Any]]) -> str:
    """Write ``records`` as an obj36 TSV (atomically: a temporary file, then a rename); returns the path."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as handle:
        for record in records:
            handle.write(encode_row(record) + "\n")
    os.replace(tmp, path)
    return path


def iter_obj_tsv(path: str, feature_dim: Optional[int] = FEATURE_DIM, topk: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """Decoded records of ``path`` in file order (the first ``topk`` only, like the reference's ``topk``)."""
    with _open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if topk is not None and line_no > topk:
                return
            if line.strip():
                yield decode_row(line.decode("ascii", errors="replace"), path, line_no, feature_dim)


def normalise_boxes(boxes: np.ndarray, img_h: int, img_w: int, where: str = "<tsv>") -> np.ndarray:
    """x1, x2 / img_w and y1, y2 / img_h as float32 [N, 4]; values outside [-1e-5, 1 + 1e-5] are a
    DataError (the reference asserts the same)."""
    if img_h <= 0 or img_w <= 0:
        raise DataError(f"{where}: image size must be positive, got img_h={img_h}, img_w={img_w}.")
    scale = np.array([img_w, img_h, img_w, img_h], dtype=np.float32)
    normed = np.asarray(boxes, dtype=np.float32) / scale
    if normed.size and (normed.min() < -BOX_TOLERANCE or normed.max() > 1 + BOX_TOLERANCE):
        raise DataError(
            f"{where}: boxes fall outside the image after dividing by (W, H) = ({img_w}, {img_h}): range "
            f"[{normed.min():.4f}, {normed.max():.4f}]. Are img_h and img_w swapped, or the boxes not in pixels?"
        )
    return normed


def _open(path: str):
    if not os.path.isfile(path):
        raise DataError(
            f"LXMERT feature file not found: {path}. The official obj36 TSVs come from the LXMERT repo's data "
            f"download (e.g. mscoco_imgfeat/train2014_obj36.tsv)."
        )
    return open(path, "rb")


# ----------------------------------------------------------------------------------------------
# Random access by image id
# ----------------------------------------------------------------------------------------------
class ObjTsvFeatures:
    """Random access to one or more obj36 TSVs by ``img_id``.

    ``feats, boxes = store[img_id]``: float32 tensors ``[N, D]`` and ``[N, 4]`` (boxes normalised by
    W, H, as the model takes them). ``store.record(img_id)`` gives every decoded column. The index
    (image id -> file and byte offset) is built in one pass at construction; a duplicated id is a
    DataError naming both places. File handles are opened per process (DataLoader workers).
    """

    def __init__(self, paths: Union[str, Sequence[str]], feature_dim: Optional[int] = FEATURE_DIM):
        self.paths: List[str] = [paths] if isinstance(paths, str) else list(paths)
        self.feature_dim = feature_dim
        self._index: Dict[str, Tuple[int, int, int]] = {}  # img_id -> (file, offset, line number)
        for file_index, path in enumerate(self.paths):
            self._index_file(file_index, path)
        self._handles: Dict[int, Any] = {}
        self._pid = os.getpid()

    def _index_file(self, file_index: int, path: str) -> None:
        offset = 0
        with _open(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    img_id = line.split(b"\t", 1)[0].decode("ascii", errors="replace")
                    if img_id in self._index:
                        other, _, other_line = self._index[img_id]
                        raise DataError(
                            f"img_id {img_id!r} appears twice: {self.paths[other]} line {other_line} and {path} "
                            f"line {line_no}. Remove the duplicate line."
                        )
                    self._index[img_id] = (file_index, offset, line_no)
                offset += len(line)

    def keys(self) -> List[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, img_id: str) -> bool:
        return img_id in self._index

    def _handle(self, file_index: int):
        if os.getpid() != self._pid:  # forked worker: do not share the parent's file positions
            self._handles, self._pid = {}, os.getpid()
        if file_index not in self._handles:
            self._handles[file_index] = _open(self.paths[file_index])
        return self._handles[file_index]

    def record(self, img_id: str) -> Dict[str, Any]:
        """Every column of ``img_id``'s line, decoded (see :func:`decode_row`)."""
        if img_id not in self._index:
            raise DataError(
                f"img_id {img_id!r} is not in {', '.join(self.paths)} ({len(self)} images). Check that the "
                f"annotation split and the feature file belong together."
            )
        file_index, offset, line_no = self._index[img_id]
        handle = self._handle(file_index)
        handle.seek(offset)
        line = handle.readline().decode("ascii", errors="replace")
        return decode_row(line, self.paths[file_index], line_no, self.feature_dim)

    def __getitem__(self, img_id: str) -> Tuple[torch.Tensor, torch.Tensor]:
        item = self.record(img_id)
        where = f"{self.paths[self._index[img_id][0]]} (img_id {img_id!r})"
        boxes = normalise_boxes(item["boxes"], item["img_h"], item["img_w"], where)
        return torch.from_numpy(np.array(item["features"], dtype=np.float32)), torch.from_numpy(boxes)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self) -> Dict[str, Any]:  # picklable for DataLoader workers (spawn)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def tsv_to_img_db(tsv_paths: Sequence[str], img_dir: str, key_format: str = "{img_id}", num_bb: int = 36) -> str:
    """Convert obj36 TSVs into one UNITER-format img_db (what the task builders read), keyed by
    ``key_format`` filled with each ``img_id``. Boxes become ``norm_bb`` ``(x1, y1, x2, y2, w, h)``
    divided by (W, H); ``conf`` is ``objects_conf``; the first ``num_bb`` boxes are kept (the dataset
    config then reads it with ``conf_th: -1, num_bb: 36``). The img_db stores fp16: features are rounded once (relative error
    ≤ 2⁻¹¹); read the TSV with :class:`ObjTsvFeatures` where exact fp32 matters. Returns the LMDB path.
    """
    from villa_plugin.datasets.features import write_img_db

    def records():
        for path in tsv_paths:
            for row in iter_obj_tsv(path):
                where = f"{path}, image {row['img_id']}"
                boxes = normalise_boxes(row["boxes"], row["img_h"], row["img_w"], where)
                sizes = boxes[:, 2:4] - boxes[:, 0:2]
                yield key_format.format(img_id=row["img_id"]), {
                    "features": np.asarray(row["features"], dtype=np.float32),
                    "norm_bb": np.concatenate([boxes, sizes], axis=1).astype(np.float32),
                    "conf": np.asarray(row["objects_conf"], dtype=np.float32).reshape(-1, 1),
                }

    return write_img_db(img_dir, records(), conf_th=-1, max_bb=num_bb, min_bb=num_bb, num_bb=num_bb)


__all__ = [
    "tsv_to_img_db",
    "FIELDNAMES",
    "ARRAY_FIELDS",
    "ObjTsvFeatures",
    "decode_row",
    "encode_row",
    "iter_obj_tsv",
    "normalise_boxes",
    "write_obj_tsv",
]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m villa_plugin.backbones.lxmert.tsv IN.tsv [IN.tsv ...] --out IMG_DB_DIR [--key-format F]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Convert LXMERT obj36 TSVs into a UNITER-format img_db.")
    parser.add_argument("tsv", nargs="+", help="obj36 TSV files")
    parser.add_argument("--out", required=True, help="img_db directory to write")
    parser.add_argument("--key-format", default="{img_id}", help="image key, e.g. {img_id} (GQA) or {img_id}.npz")
    parser.add_argument("--num-bb", type=int, default=36)
    args = parser.parse_args(argv)
    print(tsv_to_img_db(args.tsv, args.out, args.key_format, args.num_bb))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
