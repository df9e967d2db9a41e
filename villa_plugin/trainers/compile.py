"""``training.compile`` / ``training.compile_backend``: ``torch.compile`` of the model's forward.

``nn.Module.compile`` compiles in place and keeps the module (and its state_dict keys) as it is,
so checkpoints, distributed wrappers, the adversarial engine and ``unwrap`` see the same model.
Batches vary in length, so dynamo recompiles on the first new shape and then marks the varying
dims dynamic (automatic dynamic shapes); :func:`compile_stats` counts the graphs it built.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from torch import nn

from villa_plugin.common.config_access import setting
from villa_plugin.common.errors import ConfigError

logger = logging.getLogger(__name__)


def compile_backend(config: Any) -> Optional[str]:
    """The backend to compile with, or None when ``training.compile`` is off."""
    if not setting(config, "training.compile"):
        return None
    backend = str(setting(config, "training.compile_backend"))
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ConfigError(f"training.compile_backend={backend!r} is not a torch.compile backend; use one of {sorted(backends)}")
    return backend


def compile_model(model: nn.Module, config: Any) -> Optional[str]:
    """Compile ``model``'s forward in place when ``training.compile`` is on; returns the backend."""
    backend = compile_backend(config)
    if backend is not None:
        model.compile(backend=backend)
        logger.info("training.compile: %s's forward compiled with backend %s", type(model).__name__, backend)
    return backend


def compile_stats() -> Dict[str, int]:
    """Graphs dynamo built (first compiles + recompiles) and graph breaks, process-wide."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def log_compile_stats(config: Any) -> None:
    """Log :func:`compile_stats` when the run compiled."""
    if setting(config, "training.compile"):
        logger.info("training.compile: %(graphs)d graphs built, %(graph_breaks)d graph breaks", compile_stats())
