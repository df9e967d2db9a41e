"""Reading one dotted key from a config that may be partial (OmegaConf node, dict or None)."""
from __future__ import annotations

from typing import Any


def config_value(config: Any, dotted: str, default: Any = None) -> Any:
    """``config.a.b`` or ``default`` when any level is missing or the value is null."""
    node = config
    for key in dotted.split("."):
        if node is None:
            return default
        node = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
    return default if node is None else node
