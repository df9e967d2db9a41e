"""Loading user-supplied weight files safely (never unpickling arbitrary objects)."""
from __future__ import annotations

import os
import pickle
from typing import Dict

import numpy as np
import torch

from villa_plugin.common.errors import CheckpointError

RANDOM = "random"


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles detectron2-style ``.pkl`` files: dicts / lists of numpy arrays and scalars, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def load_state_dict(path: str, what: str, where_from: str) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, a torch file (``weights_only=True``) or a detectron2 ``.pkl``.

    A ``{"model": {...}}`` / ``{"state_dict": {...}}`` wrapper is unwrapped. ``where_from`` says where
    the documented files come from; it is part of the error for a missing or unreadable file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} weights file not found: {path}. {where_from}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        elif path.endswith(".pkl"):
            with open(path, "rb") as fh:
                state = _ArraysOnlyUnpickler(fh, encoding="latin1").load()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read means the file is not one of the documented ones
        raise CheckpointError(f"Cannot read {what} weights {path}: {err}. {where_from}") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} weights {path} hold a {type(state).__name__}, not a state dict. {where_from}")
    out = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            out[str(key)] = value
    return out


def strip_prefixes(state: Dict[str, torch.Tensor], prefixes=("module.",)) -> Dict[str, torch.Tensor]:
    """Drop a leading ``module.`` (DataParallel) from every key."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: str, what: str,
                where_from: str, ignore=()) -> None:
    """``module.load_state_dict(state)`` whose mismatch error names the file, the keys and the source."""
    state = {k: v for k, v in state.items()
             if not k.endswith("num_batches_tracked") and not any(k.startswith(p) for p in ignore)}
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:4])})")
        raise CheckpointError(f"{what} weights {path} do not fit the model: {'; '.join(parts)}. {where_from}")
    module.load_state_dict(state, strict=False)
