"""Atomic checkpoint files and the state they hold.

Files under ``<save_dir>``: ``current.ckpt`` (latest), ``best.ckpt`` (best early-stopping value)
and ``models/model_<update>.ckpt`` (the last ``checkpoint.max_to_keep``). Each is an independent copy
(never a hard link), so damage to one file never takes its backup with it; ``checkpoint.resume``
falls back to the newest readable ``models/model_<update>.ckpt`` when ``current.ckpt`` is damaged
(:meth:`CheckpointFiles.load_latest`). A checkpoint holds only
tensors and plain Python containers (the config as a YAML string), so
``torch.load(path, weights_only=True)`` reads it.

Writes go to a temporary file in the same directory, are fsync'ed and then ``os.replace``d over the
target, so a crash mid-write never damages the previous checkpoint.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
from torch import nn

from villa_plugin.common.errors import CheckpointError

logger = logging.getLogger(__name__)
CURRENT = "current.ckpt"
BEST = "best.ckpt"
MODELS_DIR = "models"
_MODEL_FILE = re.compile(r"^model_(\d+)\.ckpt$")


# -- atomic files ---------------------------------------------------------------------------
def save_checkpoint(path: str, state: Mapping[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``).

    A failed write (disk full, file-size limit, a file where a directory should be) leaves the
    previous file as it was and raises CheckpointError naming ``path`` and the fix."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            writer = _ErrorRecordingWriter(handle)
            try:
                torch.save(dict(state), writer)
            except RuntimeError:  # torch reports a failed write as a RuntimeError: surface the cause
                if writer.error is not None:
                    raise writer.error from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            _remove_quietly(tmp)
        raise CheckpointError(write_error_message(path, error)) from None
    except BaseException:
        if tmp is not None:
            _remove_quietly(tmp)
        raise
    _fsync_dir(directory)
    return path


def copy_checkpoint(source: str, target: str) -> str:
    """Atomically make ``target`` an independent copy of ``source`` (copied bytes, fsync'ed; never a
    hard link, so damage to one file cannot reach the other)."""
    directory = os.path.dirname(os.path.abspath(target))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        if os.path.getsize(tmp) != os.path.getsize(source):
            raise OSError(errno.EIO, f"copy of {source} is incomplete")
        os.replace(tmp, target)
    except OSError as error:
        if tmp is not None:
            _remove_quietly(tmp)
        raise CheckpointError(write_error_message(target, error)) from None
    except BaseException:
        if tmp is not None:
            _remove_quietly(tmp)
        raise
    _fsync_dir(directory)
    return target


class _ErrorRecordingWriter:
    """A file wrapper for ``torch.save`` that keeps the first OSError a write raised."""

    def __init__(self, handle):
        self.handle = handle
        self.error = None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self):
        return self.handle.flush()


_WRITE_HINTS = {
    errno.EFBIG: "the file-size limit of this process (ulimit -f) is smaller than the checkpoint: raise it",
    errno.ENOSPC: "the disk is full: free space or set env.save_dir on another filesystem",
    errno.EDQUOT: "the disk quota is used up: free space or set env.save_dir elsewhere",
    errno.EROFS: "the filesystem is read-only: set env.save_dir to a writable directory",
    errno.EACCES: "permission denied: set env.save_dir to a directory you can write",
    errno.EEXIST: "a regular file stands where a directory is needed: move it or choose another env.save_dir",
    errno.ENOTDIR: "a regular file stands where a directory is needed: move it or choose another env.save_dir",
}


def write_error_message(path: str, error: OSError) -> str:
    """One paragraph for a failed write of ``path``: the system's reason and the fix."""
    reason = error.strerror or str(error)
    hint = _WRITE_HINTS.get(error.errno, "check that env.save_dir is writable and has free space")
    return f"Cannot write checkpoint {path}: {reason}; {hint}. The previous checkpoint files are unchanged."


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU; CheckpointError when it cannot."""
    if not os.path.isfile(path):
        raise CheckpointError(
            f"Checkpoint file not found: {path}. To start fresh, set checkpoint.resume=False and leave "
            f"checkpoint.resume_file empty (or point checkpoint.resume_file at an existing file)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {type(error).__name__}: {error}. The file may be truncated or not "
            f"a torch checkpoint; checkpoints holding pickled Python objects (e.g. OmegaConf) cannot be loaded "
            f"safely. Use another file (models/model_<update>.ckpt keeps older ones) or start fresh."
        ) from None


def _short_reason(error: CheckpointError) -> str:
    text = str(error)
    return "not found" if text.startswith("Checkpoint file not found") else text.split(". ")[0].split(": ", 1)[-1]


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- the files of one run -------------------------------------------------------------------
class CheckpointFiles:
    """``current.ckpt`` / ``best.ckpt`` / ``models/model_<update>.ckpt`` under ``save_dir``."""

    def __init__(self, save_dir: str, max_to_keep: int = 3):
        self.save_dir = save_dir
        self.max_to_keep = int(max_to_keep)

    @property
    def current(self) -> str:
        return os.path.join(self.save_dir, CURRENT)

    @property
    def best(self) -> str:
        return os.path.join(self.save_dir, BEST)

    def model_file(self, update: int) -> str:
        return os.path.join(self.save_dir, MODELS_DIR, f"model_{update}.ckpt")

    def save(self, state: Mapping[str, Any], update: int, keep: bool = True, best: bool = False) -> None:
        """Write ``current.ckpt``; also ``models/model_<update>.ckpt`` when ``keep``, ``best.ckpt`` when ``best``."""
        save_checkpoint(self.current, state)
        if keep:
            copy_checkpoint(self.current, self.model_file(update))
            self.prune()
        if best:
            copy_checkpoint(self.current, self.best)

    def kept_updates(self) -> List[int]:
        """Update numbers of the ``models/model_<update>.ckpt`` files present, newest first."""
        directory = os.path.join(self.save_dir, MODELS_DIR)
        if not os.path.isdir(directory):
            return []
        return sorted((int(m.group(1)) for name in os.listdir(directory) if (m := _MODEL_FILE.match(name))), reverse=True)

    def load_latest(self) -> Tuple[Dict[str, Any], str]:
        """``(state, path)`` of ``current.ckpt``, or, when it is missing or unreadable, of the newest
        readable ``models/model_<update>.ckpt`` (logged as a warning naming both files). Raises the
        error of ``current.ckpt`` when no file can be read."""
        try:
            return load_checkpoint(self.current), self.current
        except CheckpointError as error:
            first_error = error
        damaged: List[str] = [self.current]
        for update in self.kept_updates():
            path = self.model_file(update)
            try:
                state = load_checkpoint(path)
            except CheckpointError:
                damaged.append(path)
                continue
            logger.warning(
                "checkpoint.resume: %s cannot be used (%s); resuming from %s instead, the newest readable "
                "checkpoint%s.", self.current, _short_reason(first_error), path,
                f" (also unreadable: {', '.join(damaged[1:])})" if len(damaged) > 1 else "",
            )
            return state, path
        if len(damaged) > 1:
            raise CheckpointError(
                f"{first_error} No readable fallback either: {', '.join(damaged[1:])} are damaged too. Start "
                f"fresh in a new env.save_dir."
            ) from None
        raise first_error

    def prune(self) -> None:
        """Delete all but the newest ``max_to_keep`` ``models/model_<update>.ckpt`` (<= 0: keep all)."""
        if self.max_to_keep <= 0:
            return
        directory = os.path.join(self.save_dir, MODELS_DIR)
        found = sorted(
            (int(m.group(1)), name) for name in os.listdir(directory) if (m := _MODEL_FILE.match(name))
        )
        for _, name in found[: -self.max_to_keep]:
            _remove_quietly(os.path.join(directory, name))


# -- RNG state ------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors / plain containers."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_value))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- model weights --------------------------------------------------------------------------
def model_weights(checkpoint: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The model state of a checkpoint: its ``model`` entry, or the mapping itself (raw state dicts)."""
    inner = checkpoint.get("model")
    return inner if isinstance(inner, Mapping) else checkpoint


def map_prefixes(weights: Mapping[str, torch.Tensor], mapping: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """Keep the keys under a ``{prefix_in_file: prefix_in_model}`` prefix, renamed; all keys when empty."""
    if not mapping:
        return dict(weights)
    mapped = {}
    for key, value in weights.items():
        for source, target in mapping.items():
            if key == source or key.startswith(source + ".") or source == "":
                rest = key[len(source) :].lstrip(".") if source else key
                mapped[".".join(p for p in (target, rest) if p)] = value
                break
    return mapped


def check_model_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], strict: bool = True, source: str = "checkpoint"):
    """Shape mismatches (and, when ``strict``, missing or unexpected keys) raise CheckpointError
    naming the keys. Returns (missing, unexpected) key lists."""
    own = model.state_dict()
    for key, value in weights.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: the checkpoint has {tuple(value.shape)}, the model "
                f"{tuple(own[key].shape)}. Check that model_config matches the run that wrote it."
            )
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} does not fit the model: missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}. To load only the "
            f"matching weights use checkpoint.resume_pretrained=True (with checkpoint.pretrained_state_mapping)."
        )
    return missing, unexpected


def load_model_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], strict: bool = True, source: str = "checkpoint"):
    """:func:`check_model_weights`, then copy the matching ``weights`` into ``model``."""
    missing, unexpected = check_model_weights(model, weights, strict, source)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return missing, unexpected
