"""Atomic checkpoint files and the state they hold.

Files under ``<save_dir>``: ``current.ckpt`` (latest), ``best.ckpt`` (best early-stopping value)
and ``models/model_<update>.ckpt`` (the last ``checkpoint.max_to_keep``). A checkpoint holds only
tensors and plain Python containers (the config as a YAML string), so
``torch.load(path, weights_only=True)`` reads it.

Writes go to a temporary file in the same directory, are fsync'ed and then ``os.replace``d over the
target, so a crash mid-write never damages the previous checkpoint.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, Mapping

import numpy as np
import torch
from torch import nn

from villa_plugin.common.errors import CheckpointError

CURRENT = "current.ckpt"
BEST = "best.ckpt"
MODELS_DIR = "models"
_MODEL_FILE = re.compile(r"^model_(\d+)\.ckpt$")


# -- atomic files ---------------------------------------------------------------------------
def save_checkpoint(path: str, state: Mapping[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(directory)
    return path


def copy_checkpoint(source: str, target: str) -> str:
    """Atomically make ``target`` hold the same bytes as ``source`` (a hard link when possible)."""
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    os.close(fd)
    try:
        os.remove(tmp)
        try:
            os.link(source, tmp)  # files are only ever replaced, never rewritten: sharing is safe
        except OSError:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(directory)
    return target


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
