"""Read-only LMDB handles that open lazily in each process, and a small writer.

Opening with locking from many DataLoader workers blows up memory, and transactions must not cross
a ``fork``. So environments open read-only without locking, on first use; each process begins its
own transaction (after the fork), and the handle is dropped when pickled (spawn workers reopen).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Tuple

import lmdb

from villa_plugin.common.errors import DataError


# One read-only environment per data file. py-lmdb refuses to open the same file twice in a
# process (several datasets may read one db, e.g. train and val both use coco_val2014), and a forked
# worker inherits its parent's open environments, so it reuses them: with ``lock=False`` and a
# read-only map that is safe, and each process still begins its own transactions.
_ENVS: Dict[str, Tuple[Tuple[int, int], lmdb.Environment]] = {}


def _shared_env(path: str, what: str) -> lmdb.Environment:
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError as err:
        raise DataError(f"Cannot open {what} {path}: {err}") from err
    real, ident = os.path.realpath(path), (st.st_dev, st.st_ino)
    cached = _ENVS.get(real)
    if cached is not None and cached[0] == ident:
        return cached[1]
    if cached is not None:  # the db was re-created at this path: the old map is stale
        cached[1].close()
        del _ENVS[real]
    try:
        env = lmdb.open(path, readonly=True, lock=False, create=False, readahead=False, subdir=True,
                        max_readers=1024)
    except lmdb.Error as err:
        raise DataError(
            f"Cannot open {what} {path}: {err}. The data.mdb file there is damaged or not an LMDB; copy "
            f"it again from its source."
        ) from err
    try:
        check_complete(path, env, what)
    except DataError:
        env.close()
        raise
    _ENVS[real] = (ident, env)
    return env


def check_complete(path: str, env: lmdb.Environment, what: str = "LMDB") -> None:
    """DataError when ``data.mdb`` is shorter than its pages need (a half-copied file): reading
    past its end would kill the process with SIGBUS. The meta pages say how many pages were
    written (``last_pgno + 1``, each ``psize`` bytes)."""
    data = os.path.join(path, "data.mdb")
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    actual = os.path.getsize(data)
    if actual < needed:
        raise DataError(
            f"{what} {data} is truncated: its pages need {needed} bytes but the file holds {actual} "
            f"({100 * actual // max(needed, 1)}%), e.g. an interrupted copy or download. Copy the whole "
            f"directory {path} again (or re-create it), then rerun."
        )


class LazyLmdb:
    """Read-only LMDB at ``path`` (a directory holding ``data.mdb``), opened per process on first use."""

    def __init__(self, path: str, what: str = "LMDB", how_to_get: str = ""):
        self.path = str(path)
        self.what = what
        if not os.path.isfile(os.path.join(self.path, "data.mdb")):
            hint = f" {how_to_get}" if how_to_get else ""
            raise DataError(f"{what} not found: {self.path} (no data.mdb there).{hint}")
        self._txn = None
        self._pid: Optional[int] = None
        _shared_env(self.path, what)  # opened (and its size checked) here, so a bad file fails early

    def _open(self):
        if self._txn is None or self._pid != os.getpid():
            # buffers: values come as zero-copy views of the map (see get_view); get() copies
            self._txn = _shared_env(self.path, self.what).begin(buffers=True)
            self._pid = os.getpid()
        return self._txn

    def get(self, key: str) -> Optional[bytes]:
        """Raw value of ``key`` (a str), or None when absent."""
        value = self._open().get(key.encode("utf-8"))
        return None if value is None else bytes(value)

    def get_view(self, key: str) -> Optional[memoryview]:
        """Value of ``key`` as a read-only view into the memory map, without the copy :meth:`get`
        makes, or None. Valid only while this handle's transaction lives (until :meth:`close`, a
        fork or pickling): decode it at once and keep only copies."""
        return self._open().get(key.encode("utf-8"))

    def __contains__(self, key: str) -> bool:
        return self.get_view(key) is not None

    def close(self) -> None:
        """Drop this handle's transaction (the environment stays open for other readers)."""
        self._txn = self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_txn=None, _pid=None)
        return state


def write_lmdb(path: str, items: Iterable[Tuple[str, bytes]], commit_every: int = 1000) -> int:
    """Write ``(key, value)`` pairs into a new LMDB directory at ``path``; returns how many were written.

    The map grows as needed, so no size has to be guessed up front.
    """
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=64 * 1024 * 1024, subdir=True, meminit=True)
    count = 0
    pending = []

    def flush():
        while True:
            try:
                with env.begin(write=True) as txn:
                    for k, v in pending:
                        txn.put(k.encode("utf-8"), v)
                break
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
        pending.clear()

    try:
        for key, value in items:
            pending.append((key, value))
            count += 1
            if len(pending) >= commit_every:
                flush()
        flush()
    finally:
        env.close()
    return count
