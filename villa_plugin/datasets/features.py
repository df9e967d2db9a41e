"""UNITER ``img_db`` region-feature store: reader, writer and the nbb rule (data-formats.md §1-2).

Layout of one image db directory (e.g. ``img_db/coco_train2014``)::

    feat_th{conf_th}_max{max_bb}_min{min_bb}[_compressed]/   LMDB, or feat_numbb{N}[...] / all[...]
    nbb_th{conf_th}_max{max_bb}_min{min_bb}.json            {key: nbb}, optional

Values are ``msgpack`` dicts in ``msgpack_numpy`` encoding or ``np.savez_compressed`` bytes, with
``features [n, 2048]``, ``norm_bb [n, 6]``, ``conf [n, 1]`` (fp16) and optionally ``soft_labels``.
The special key ``__keys__`` holds a JSON list of all keys. Nothing here ever unpickles.

Every record we write carries an integrity check: npz members their zip CRC-32, msgpack records a
``__crc32__`` entry over their arrays (names, dtypes, shapes, bytes), verified on every read.
msgpack records written by other tools (UNITER's own dbs) have none and are read unchecked.
"""
from __future__ import annotations

import io
import json
import logging
import os
import zipfile
import zlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import msgpack
import numpy as np
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.datasets.lmdb_utils import LazyLmdb, write_lmdb

logger = logging.getLogger(__name__)

KEYS_KEY = "__keys__"
CRC_KEY = "__crc32__"  # msgpack records: CRC-32 of their arrays (see arrays_crc32)
HOW_TO_GET = (
    "Download UNITER's image dbs with its scripts (download_vqa.sh etc. fetch img_db/<name>/), or "
    "build one from BUTD .npz files with villa_plugin.datasets.convert.convert_npz_dir_to_img_db."
)


# -- naming and the nbb rule ---------------------------------------------------------------------
def compute_num_bb(conf: np.ndarray, conf_th: float, min_bb: int, max_bb: int) -> int:
    """UNITER's rule: ``clamp(#(conf > conf_th), min_bb, max_bb)``."""
    return int(min(max_bb, max(min_bb, int((np.asarray(conf) > conf_th).sum()))))


def db_dirname(conf_th: float, max_bb: int, min_bb: int, num_bb: int, compressed: bool = False,
               keep_all: bool = False) -> str:
    """LMDB directory name for these settings (``all`` / ``feat_numbb{N}`` / ``feat_th..``)."""
    if keep_all:
        name = "all"
    elif conf_th == -1:
        name = f"feat_numbb{num_bb}"
    else:
        name = f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
    return name + ("_compressed" if compressed else "")


def nbb_json_name(conf_th: float, max_bb: int, min_bb: int) -> str:
    return f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"


def pos_feat_7d(norm_bb: torch.Tensor) -> torch.Tensor:
    """The 7-d box feature: ``norm_bb`` (x1, y1, x2, y2, w, h, normalised) plus the area ``w * h``."""
    return torch.cat([norm_bb, norm_bb[:, 4:5] * norm_bb[:, 5:6]], dim=-1)


# -- value encoding ------------------------------------------------------------------------------
def _mp_key(obj: Mapping, name: str):
    if name in obj:
        return obj[name]
    return obj.get(name.encode("ascii"))


def _safe_ndarray_hook(obj: Dict) -> Any:
    """msgpack_numpy's array encoding decoded without its pickle branch (object dtypes are refused)."""
    nd = _mp_key(obj, "nd")
    if nd is None:
        return obj
    kind = _mp_key(obj, "kind") or b""
    kind = kind.decode("ascii") if isinstance(kind, bytes) else kind
    if kind in ("O", "V"):
        raise ValueError(f"refusing a msgpack_numpy array of kind {kind!r} (it would need unpickling)")
    dtype = _mp_key(obj, "type")
    dtype = np.dtype(dtype.decode("ascii") if isinstance(dtype, bytes) else dtype)
    data = _mp_key(obj, "data")
    if nd is True:
        return np.frombuffer(data, dtype=dtype).reshape(tuple(_mp_key(obj, "shape")))
    return np.frombuffer(data, dtype=dtype)[0]


def _encode_ndarray(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) and obj.dtype.kind not in ("O", "V"):
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": list(obj.shape),
                b"data": np.ascontiguousarray(obj).tobytes()}
    raise TypeError(f"cannot encode {type(obj).__name__} in an img_db record")


def _npz_bytes(arrays: Mapping[str, np.ndarray], compressed: bool) -> bytes:
    """``np.savez[_compressed]``-compatible bytes with fixed zip timestamps (reproducible output)."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def arrays_crc32(arrays: Mapping[str, np.ndarray]) -> int:
    """CRC-32 over the arrays' names, dtypes, shapes and bytes (in name order)."""
    crc = 0
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        crc = zlib.crc32(f"{name}|{arr.dtype.str}|{arr.shape}|".encode("utf-8"), crc)
        crc = zlib.crc32(arr.reshape(-1).view(np.uint8), crc)
    return crc


def encode_record(record: Mapping[str, np.ndarray], compressed: bool = False) -> bytes:
    """One img_db value: npz-zip bytes when ``compressed``, else msgpack with msgpack_numpy arrays
    and a ``__crc32__`` entry."""
    arrays = {k: np.asarray(v) for k, v in record.items()}
    if compressed:
        return _npz_bytes(arrays, compressed=True)
    return msgpack.packb({**arrays, CRC_KEY: arrays_crc32(arrays)}, default=_encode_ndarray, use_bin_type=True)


def decode_record(value, verify: bool = True) -> Dict[str, np.ndarray]:
    """Decode either encoding (sniffed: npz values are zip archives starting with ``PK``) from bytes
    or a buffer (the arrays returned own their memory); a record whose bytes do not match its CRC
    raises ValueError (``verify=False`` skips that check, for a record already verified; npz
    members are always checked by zip)."""
    if value[:2] == b"PK":
        with np.load(io.BytesIO(value), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    out = msgpack.unpackb(value, raw=False, object_hook=_safe_ndarray_hook, strict_map_key=False)
    if not isinstance(out, dict):
        raise ValueError(f"expected a dict, got {type(out).__name__}")
    arrays = {(k.decode() if isinstance(k, bytes) else k): v for k, v in out.items()}
    stored = arrays.pop(CRC_KEY, None)
    if verify and stored is not None and stored != arrays_crc32(arrays):
        raise ValueError(f"its bytes do not match its {CRC_KEY} checksum (the record is damaged)")
    return arrays


# -- reader --------------------------------------------------------------------------------------
class ImgFeatDB:
    """Reader of one UNITER image db directory.

    ``db[key]`` -> ``(img_feat float32 [nbb, 2048], img_pos_feat float32 [nbb, 7])``.
    ``nbb(key)`` comes from the side json when present, else from ``conf`` (or ``num_bb`` when
    ``conf_th == -1``), capped at the rows stored. Images with fewer than ``min_bb`` boxes are used
    as they are, counted in ``num_below_min`` and warned about once; zero boxes raise DataError.
    """

    def __init__(self, img_dir: str, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 num_bb: int = 36, compressed: bool = False):
        self.img_dir = str(img_dir)
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, int(max_bb), int(min_bb), int(num_bb)
        if not os.path.isdir(self.img_dir):
            raise DataError(f"Image feature db directory not found: {self.img_dir}. {HOW_TO_GET}")
        self.db_path, self._name2nbb = self._resolve(compressed)
        self.db = LazyLmdb(self.db_path, what="img_db LMDB", how_to_get=HOW_TO_GET)
        self._below_min: set = set()
        # keys whose record passed its CRC in this process: the map is read-only, so a record reread
        # (VQA has ~5 questions per image) skips the check, ~60 µs per 37-region record
        self._verified: set = set()
        self._nbb_cache: Dict[str, int] = {}
        logger.info("img_db %s (nbb from %s)", self.db_path, "json" if self._name2nbb else "conf")

    def _resolve(self, compressed: bool) -> Tuple[str, Optional[Dict[str, int]]]:
        # the configured variant first, then the other compression, then the keep-all dumps
        order = (compressed, not compressed)
        names = [db_dirname(self.conf_th, self.max_bb, self.min_bb, self.num_bb, c) for c in order]
        names += [db_dirname(0, 0, 0, 0, c, keep_all=True) for c in order]
        for name in names:
            path = os.path.join(self.img_dir, name)
            if os.path.isfile(os.path.join(path, "data.mdb")):
                nbb = None
                json_path = os.path.join(self.img_dir, nbb_json_name(self.conf_th, self.max_bb, self.min_bb))
                if self.conf_th != -1 and not name.startswith("all") and os.path.isfile(json_path):
                    nbb = _load_json(json_path)
                return path, nbb
        tried = ", ".join(names)
        raise DataError(
            f"No image feature LMDB in {self.img_dir} for conf_th={self.conf_th}, max_bb={self.max_bb}, "
            f"min_bb={self.min_bb}, num_bb={self.num_bb} (looked for {tried}). Check these settings "
            f"against the directory names there. {HOW_TO_GET}"
        )

    def keys(self) -> List[str]:
        """All image keys (from ``__keys__``, else from the nbb json)."""
        raw = self.db.get(KEYS_KEY)
        if raw is not None:
            return list(json.loads(raw.decode("utf-8")))
        if self._name2nbb is not None:
            return list(self._name2nbb)
        raise DataError(f"img_db {self.db_path} has no {KEYS_KEY} entry and no nbb json to list its keys.")

    def __contains__(self, key: str) -> bool:
        if self._name2nbb is not None:
            return key in self._name2nbb
        return key in self.db

    def _record(self, key: str) -> Dict[str, np.ndarray]:
        value = self.db.get_view(key)  # decoding copies what it keeps (msgpack bin / npz members)
        if value is None:
            raise DataError(
                f'Image "{key}" is not in img_db {self.db_path}. The annotation refers to an image this '
                f"db does not hold: check that each txt_db / question file is paired with its img_db."
            )
        try:
            rec = decode_record(value, verify=key not in self._verified)
            feat, bb = rec["features"], rec["norm_bb"]
            if feat.ndim != 2 or bb.ndim != 2 or bb.shape[1] != 6 or bb.shape[0] != feat.shape[0]:
                raise ValueError(f"features {feat.shape} / norm_bb {bb.shape} (want [n, D] / [n, 6])")
        except DataError:
            raise
        except Exception as err:  # any decoding failure means the record is unusable
            raise DataError(
                f'Corrupt record "{key}" in img_db {self.db_path}: {err}. Copy the db again from its source, '
                f"or re-create it with villa_plugin.datasets.convert.convert_npz_dir_to_img_db."
            ) from err
        self._verified.add(key)
        return rec

    def nbb(self, key: str) -> int:
        """Number of boxes this image contributes (validated: > 0)."""
        if self._name2nbb is not None and key in self._name2nbb:
            n = int(self._name2nbb[key])
        elif key in self._nbb_cache:
            n = self._nbb_cache[key]
        else:
            n = self._nbb_cache[key] = self._nbb_from_record(self._record(key))
        return self._check_nbb(key, n)

    def _nbb_from_record(self, rec: Dict[str, np.ndarray]) -> int:
        rows = int(rec["features"].shape[0])
        if self.conf_th == -1:
            return min(self.num_bb, rows)
        if "conf" not in rec:
            raise DataError(f"img_db {self.db_path} records have no 'conf' to compute nbb from")
        return min(rows, compute_num_bb(rec["conf"], self.conf_th, self.min_bb, self.max_bb))

    def _check_nbb(self, key: str, n: int) -> int:
        if n <= 0:
            raise DataError(f'Image "{key}" in img_db {self.db_path} has zero boxes; drop its questions '
                            f"or re-extract its features.")
        if n < self.min_bb and self.conf_th != -1 and key not in self._below_min:
            self._below_min.add(key)
            if len(self._below_min) == 1:
                logger.warning('img_db %s: image "%s" has %d boxes < min_bb=%d; such images are used '
                               "as they are and counted (num_below_min).", self.db_path, key, n, self.min_bb)
        return n

    @property
    def num_below_min(self) -> int:
        """How many distinct images seen so far (in this process) have fewer than ``min_bb`` boxes."""
        return len(self._below_min)

    def feature_dim(self) -> Optional[int]:
        """The width of this db's region features (read from its first record; None when the db
        cannot list its keys)."""
        try:
            keys = self.keys()
        except DataError:
            return None
        return int(self._record(keys[0])["features"].shape[1]) if keys else None

    def __getitem__(self, key: str) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.regions(key, torch.float32)

    def regions(self, key: str, feat_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(img_feat [nbb, D], img_pos_feat float32 [nbb, 7])``; ``img_feat`` in ``feat_dtype``, or
        as stored (fp16 in UNITER's dbs) when None: a collate that converts into its float32 batch
        (:func:`villa_plugin.datasets.collate.pad_tensors`) then skips a float32 copy per example
        and gets the same values (fp16 -> fp32 is exact)."""
        rec = self._record(key)
        n = self._check_nbb(key, min(self.nbb(key), int(rec["features"].shape[0])))
        feats = rec["features"][:n]
        if feat_dtype is None:
            feat = torch.from_numpy(np.array(feats))  # writable copy of the decoded (read-only) bytes
        else:
            # torch converts fp16 -> fp32 ~3x faster than numpy
            feat = torch.tensor(feats, dtype=feat_dtype)
        bb = torch.tensor(rec["norm_bb"][:n], dtype=torch.float32)
        return feat, pos_feat_7d(bb)

    def dump(self, key: str) -> Dict[str, np.ndarray]:
        """Every stored array of ``key`` (e.g. ``soft_labels`` for pretraining), cut to nbb rows, float32."""
        rec = self._record(key)
        n = self._check_nbb(key, min(self.nbb(key), int(rec["features"].shape[0])))
        return {k: np.asarray(v[:n] if v.ndim == 2 else v, dtype=np.float32) for k, v in rec.items()}

    def __repr__(self) -> str:
        return f"ImgFeatDB({self.db_path!r})"


def _load_json(path: str):
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise DataError(f"Cannot read JSON file {path}: {err}") from err


# -- writer --------------------------------------------------------------------------------------
def truncate_record(record: Mapping[str, np.ndarray], nbb: Optional[int]) -> Dict[str, np.ndarray]:
    """convert_imgdir's storage rule: fp32 -> fp16, 2-d arrays cut to ``nbb`` rows, 1-d kept."""
    out = {}
    for name, arr in record.items():
        arr = np.asarray(arr)
        if arr.dtype == np.float32 or arr.dtype == np.float64:
            arr = arr.astype(np.float16)
        if arr.ndim == 2:
            out[name] = np.ascontiguousarray(arr[:nbb])
        elif arr.ndim == 1:
            out[name] = arr
        else:
            raise DataError(f"img_db field {name!r} has {arr.ndim} dims (want 1 or 2)")
    return out


def write_img_db(img_dir: str, records: Iterable[Tuple[str, Mapping[str, np.ndarray]]],
                 compressed: bool = False, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 num_bb: int = 36, keep_all: bool = False) -> str:
    """Write ``(key, {features, norm_bb, conf[, soft_labels]})`` records as a UNITER image db.

    Applies the nbb rule (``conf_th == -1``: ``num_bb`` boxes; ``keep_all``: every box), stores fp16,
    writes ``__keys__`` and, for a threshold db, the ``nbb_th..json`` side file. Returns the LMDB path.
    """
    os.makedirs(img_dir, exist_ok=True)
    db_path = os.path.join(img_dir, db_dirname(conf_th, max_bb, min_bb, num_bb, compressed, keep_all))
    if os.path.exists(os.path.join(db_path, "data.mdb")):
        raise DataError(f"{db_path} already exists; remove it or write to another directory.")
    name2nbb: Dict[str, int] = {}

    def items():
        for key, rec in records:
            if key == KEYS_KEY:
                raise DataError(f"{KEYS_KEY} is reserved and cannot be an image key")
            rows = int(np.asarray(rec["features"]).shape[0])
            if keep_all:
                nbb = None
            elif conf_th == -1:
                nbb = min(num_bb, rows)
            else:
                nbb = min(rows, compute_num_bb(rec["conf"], conf_th, min_bb, max_bb))
            name2nbb[key] = rows if nbb is None else nbb
            yield key, encode_record(truncate_record(rec, nbb), compressed)
        yield KEYS_KEY, json.dumps(list(name2nbb)).encode("utf-8")

    write_lmdb(db_path, items())
    if conf_th != -1 and not keep_all:
        with open(os.path.join(img_dir, nbb_json_name(conf_th, max_bb, min_bb)), "w", encoding="utf-8") as fh:
            json.dump(name2nbb, fh)
    return db_path
