"""Resumable writers: each batch is committed before the next one starts, and a re-run skips the
keys already written. A crash loses at most the batch being written.

- :class:`ImgDbWriter`: UNITER's img_db (records through :mod:`villa_plugin.datasets.features`: the
  nbb rule, fp16, ``__keys__`` and the ``nbb_th..json`` side file). One LMDB transaction per batch;
  ``__keys__`` and the side file are rewritten (atomically) every ``sync_seconds`` and on close, and
  repaired from the records on the next run after a crash.
- :class:`TsvWriter`: LXMERT's ``obj36`` TSV, one line per image, flushed and fsynced per batch; a
  partial last line left by a crash is cut off on the next run.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import sys
import time
from typing import Dict, Iterable, List, Set, Tuple

import lmdb
import numpy as np

from villa_plugin.common.errors import DataError
from villa_plugin.datasets.features import (KEYS_KEY, compute_num_bb, db_dirname, decode_record,
                                            encode_record, nbb_json_name, truncate_record)
from villa_plugin.datasets.lmdb_utils import write_lmdb
from villa_plugin.features.regions import Regions, to_img_db_record

FP16_MAX = float(np.finfo(np.float16).max)
TSV_FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
              "num_boxes", "boxes", "features"]


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, sort_keys=isinstance(obj, dict))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_storable(key: str, record: Dict[str, np.ndarray], limit: float = FP16_MAX) -> None:
    """Refuse non-finite values and values the storage type cannot hold (fp16 would store inf)."""
    for name, arr in record.items():
        if not np.all(np.isfinite(arr)) or (arr.size and float(np.abs(arr).max()) > limit):
            raise DataError(f'Image "{key}": field {name} has non-finite values or values beyond {limit:g}; '
                            f"the backend's weights do not fit its architecture.")


class ImgDbWriter:
    """Appends records to ``<out_dir>/<feat_th..|feat_numbb..|all>[_compressed]`` (created on first use)."""

    def __init__(self, out_dir: str, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 num_bb: int = 36, compressed: bool = False, keep_all: bool = False, sync_seconds: float = 60.0):
        self.out_dir, self.conf_th, self.max_bb, self.min_bb = out_dir, conf_th, max_bb, min_bb
        self.num_bb, self.compressed, self.keep_all, self.sync_seconds = num_bb, compressed, keep_all, sync_seconds
        self.db_path = os.path.join(out_dir, db_dirname(conf_th, max_bb, min_bb, num_bb, compressed, keep_all))
        self.json_path = None
        if conf_th != -1 and not keep_all:
            self.json_path = os.path.join(out_dir, nbb_json_name(conf_th, max_bb, min_bb))
        self.name2nbb: Dict[str, int] = self._existing()
        self._last_sync = time.monotonic()
        self._dirty = False

    def _nbb(self, record: Dict[str, np.ndarray]) -> int:
        rows = int(np.asarray(record["features"]).shape[0])
        if self.keep_all:
            return rows
        if self.conf_th == -1:
            return min(self.num_bb, rows)
        return min(rows, compute_num_bb(record["conf"], self.conf_th, self.min_bb, self.max_bb))

    def _existing(self) -> Dict[str, int]:
        """nbb of every record already in the db (side file first; records it lacks are decoded)."""
        if not os.path.isfile(os.path.join(self.db_path, "data.mdb")):
            return {}
        known = {}
        if self.json_path and os.path.isfile(self.json_path):
            with open(self.json_path, "r", encoding="utf-8") as fh:
                known = json.load(fh)
        env = lmdb.open(self.db_path, readonly=True, lock=False, subdir=True)
        try:
            with env.begin() as txn:
                keys = [k.decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)]
                out = {}
                for key in keys:
                    if key == KEYS_KEY:
                        continue
                    out[key] = int(known[key]) if key in known else int(
                        decode_record(txn.get(key.encode("utf-8")))["features"].shape[0])
        finally:
            env.close()
        return out

    def keys(self) -> Set[str]:
        return set(self.name2nbb)

    def add(self, entries: List[Tuple[str, Regions]]) -> None:
        """Commit one batch (one LMDB transaction)."""
        if not entries:
            return
        values = []
        for key, regions in entries:
            record = to_img_db_record(regions)
            check_storable(key, record)
            nbb = self._nbb(record)
            values.append((key, encode_record(truncate_record(record, None if self.keep_all else nbb), self.compressed)))
            self.name2nbb[key] = nbb
        sync = time.monotonic() - self._last_sync >= self.sync_seconds
        if sync:
            values.append(self._keys_entry())
        write_lmdb(self.db_path, values, commit_every=len(values) + 1)
        self._dirty = not sync
        if sync:
            self._write_side_file()

    def _keys_entry(self) -> Tuple[str, bytes]:
        return KEYS_KEY, json.dumps(sorted(self.name2nbb)).encode("utf-8")

    def _write_side_file(self) -> None:
        self._last_sync = time.monotonic()
        if self.json_path:
            write_json_atomic(self.json_path, self.name2nbb)

    def close(self) -> None:
        """Write ``__keys__`` and the side file (also for a db that was complete already)."""
        if self.name2nbb:
            write_lmdb(self.db_path, [self._keys_entry()])
            self._write_side_file()


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")


def tsv_row(img_id: str, width: int, height: int, regions: Regions) -> List[str]:
    """One LXMERT ``obj36`` line: boxes in original-image pixels, float32 / int64 base64 columns."""
    n = len(regions)
    scale = np.array([width, height, width, height], dtype=np.float32)
    boxes = regions.boxes.float().numpy().astype(np.float32) * scale

    def ids(t):
        return (t.numpy() if t is not None else np.full(n, -1)).astype(np.int64)

    def confs(t):
        return (t.float().numpy() if t is not None else np.zeros(n)).astype(np.float32)

    feats = regions.features.float().numpy().astype(np.float32)
    return [img_id, str(height), str(width), _b64(ids(regions.obj_ids)), _b64(confs(regions.obj_conf)),
            _b64(ids(regions.attr_ids)), _b64(confs(regions.attr_conf)), str(n), _b64(boxes), _b64(feats)]


def read_tsv(path: str) -> Iterable[Dict[str, object]]:
    """Decoded rows of an ``obj36`` TSV (as LXMERT's ``load_obj_tsv`` reads them)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, "r", encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            rec = dict(zip(TSV_FIELDS, row))
            n = int(rec["num_boxes"])
            out: Dict[str, object] = {"img_id": rec["img_id"], "img_h": int(rec["img_h"]),
                                      "img_w": int(rec["img_w"]), "num_boxes": n}
            for name, dtype, shape in (("objects_id", np.int64, (n,)), ("objects_conf", np.float32, (n,)),
                                       ("attrs_id", np.int64, (n,)), ("attrs_conf", np.float32, (n,)),
                                       ("boxes", np.float32, (n, 4)), ("features", np.float32, (n, -1))):
                out[name] = np.frombuffer(base64.b64decode(rec[name]), dtype=dtype).reshape(shape)
            yield out


class TsvWriter:
    """Appends ``obj36`` lines to ``path``; ids already there are skipped by the run."""

    def __init__(self, path: str, num_boxes: int = 36):
        self.path, self.num_boxes = path, num_boxes
        self._ids: Set[str] = set()
        if os.path.exists(path):
            self._repair()
        self._fh = None

    def _repair(self) -> None:
        with open(self.path, "rb+") as fh:
            data = fh.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):  # a line cut by a crash
                fh.truncate(end)
        for line in data[:end].splitlines():
            self._ids.add(line.split(b"\t", 1)[0].decode("utf-8"))

    def keys(self) -> Set[str]:
        return set(self._ids)

    def add(self, entries: List[Tuple[str, int, int, Regions]]) -> None:
        if not entries:
            return
        if self._fh is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")
        lines = []
        for img_id, width, height, regions in entries:
            regions = regions.first(self.num_boxes)
            check_storable(img_id, {"features": regions.features.float().numpy()}, limit=float("inf"))
            lines.append("\t".join(tsv_row(img_id, width, height, regions)) + "\n")
        self._fh.write("".join(lines))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._ids.update(e[0] for e in entries)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
