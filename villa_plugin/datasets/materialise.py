"""Generated data directories written atomically: built in a temp dir beside the target, stamped
with ``VERSION.json`` and renamed into place, so a crash never leaves a half-written copy and
concurrent callers (ranks) end with one complete copy."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping


def dump_json(path: str, obj: Any) -> None:
    """One C-encoded JSON string per file (much faster than json.dump for large objects)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, sort_keys=True))


def is_current(root: str, stamp: Mapping[str, Any]) -> bool:
    """True when ``root/VERSION.json`` equals ``stamp``."""
    try:
        with open(os.path.join(root, "VERSION.json"), "r", encoding="utf-8") as fh:
            return json.load(fh) == json.loads(json.dumps(stamp))
    except (OSError, ValueError):
        return False


def materialise(root: str, stamp: Mapping[str, Any], write: Callable[[str], None]) -> str:
    """Run ``write(tmp_dir)`` and rename the result to ``root`` unless ``root`` holds a copy whose
    ``VERSION.json`` equals ``stamp``. Concurrent callers end with one complete copy; a stale or
    broken copy is replaced. Returns the absolute ``root``."""
    root = os.path.abspath(root)
    if is_current(root, stamp):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        dump_json(os.path.join(tmp, "VERSION.json"), stamp)
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
