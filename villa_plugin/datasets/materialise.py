"""Generated data directories written atomically: built in a temp dir beside the target, stamped
with ``VERSION.json`` and renamed into place, so a crash never leaves a half-written copy and
concurrent callers (ranks) end with one complete copy.

Each copy also holds ``MANIFEST.json`` (every file's size and CRC-32). A copy is used only when its
stamp matches and every file matches the manifest; a damaged copy (a truncated or edited file, a
missing one) is logged and rebuilt, since it is generated data that can always be written again."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional

from villa_plugin.common.errors import DataError

logger = logging.getLogger(__name__)

STAMP = "VERSION.json"
MANIFEST = "MANIFEST.json"
_NOT_LISTED = {STAMP, MANIFEST, "lock.mdb"}  # lock.mdb: LMDB readers may touch it


def dump_json(path: str, obj: Any) -> None:
    """One C-encoded JSON string per file (much faster than json.dump for large objects)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, sort_keys=True))


def _file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            crc = zlib.crc32(chunk, crc)
    return crc


def build_manifest(root: str) -> Dict[str, List[int]]:
    """``{relative path: [size, crc32]}`` of every file under ``root`` (stamp and manifest excluded)."""
    manifest = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name in _NOT_LISTED:
                continue
            path = os.path.join(dirpath, name)
            manifest[os.path.relpath(path, root)] = [os.path.getsize(path), _file_crc32(path)]
    return manifest


def _read_json(path: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def damage(root: str) -> Optional[str]:
    """What is wrong with the files of ``root`` compared with its manifest, or None when intact."""
    manifest = _read_json(os.path.join(root, MANIFEST))
    if not isinstance(manifest, dict) or not manifest:
        return f"{MANIFEST} is missing or unreadable"
    for rel, (size, crc) in sorted(manifest.items()):
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{rel} has {actual} bytes instead of {size}"
        if _file_crc32(path) != crc:
            return f"{rel} does not match its checksum"
    return None


def is_current(root: str, stamp: Mapping[str, Any]) -> bool:
    """True when ``root/VERSION.json`` equals ``stamp`` and every file matches the manifest."""
    return _read_json(os.path.join(root, STAMP)) == json.loads(json.dumps(stamp)) and damage(root) is None


def materialise(root: str, stamp: Mapping[str, Any], write: Callable[[str], None]) -> str:
    """Run ``write(tmp_dir)`` and rename the result to ``root`` unless ``root`` holds an intact copy
    whose ``VERSION.json`` equals ``stamp``. Concurrent callers end with one complete copy; a stale
    copy is replaced, a damaged one is logged and rebuilt. Returns the absolute ``root``."""
    root = os.path.abspath(root)
    if _read_json(os.path.join(root, STAMP)) == json.loads(json.dumps(stamp)):
        problem = damage(root)
        if problem is None:
            return root
        logger.warning("generated data in %s is damaged (%s); rebuilding it", root, problem)
    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    except OSError as err:
        raise DataError(
            f"Cannot create the generated data directory {root}: {err.strerror or err} ({err.filename or parent}). "
            f"Set env.cache_dir (or the dataset's demo_dir) to a writable directory."
        ) from None
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        dump_json(os.path.join(tmp, MANIFEST), build_manifest(tmp))
        dump_json(os.path.join(tmp, STAMP), stamp)
        if os.path.exists(root) and not is_current(root, stamp):
            stale = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
            os.rename(root, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_current(root, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
