"""Reading one dotted key from a config that may be partial (OmegaConf node, dict or None)."""
from __future__ import annotations

from typing import Any

from villa_plugin.common.errors import ConfigError

_ABSENT = object()


def _walk(config: Any, dotted: str) -> Any:
    """The value at ``dotted`` (None when null on the way), or ``_ABSENT`` when a key is missing."""
    node = config
    for key in dotted.split("."):
        if node is None:
            return None
        if hasattr(node, "get"):
            node = node.get(key, _ABSENT)
        else:
            node = getattr(node, key, _ABSENT)
        if node is _ABSENT:
            return _ABSENT
    return node


def config_value(config: Any, dotted: str, default: Any = None) -> Any:
    """``config.a.b`` or ``default`` when any level is missing or the value is null."""
    node = _walk(config, dotted)
    return default if node is None or node is _ABSENT else node


def setting(config: Any, dotted: str) -> Any:
    """``config.a.b`` of a composed config (None when null); a missing key is a ConfigError.

    The defaults live only in ``configs/defaults.yaml`` (and the models' / datasets' YAML), so
    code reads the composed config and never carries a second default of its own.
    """
    node = _walk(config, dotted)
    if node is _ABSENT:
        raise ConfigError(
            f'Config key "{dotted}" is missing. configs/defaults.yaml declares it: build the config with '
            f"villa_plugin.config.compose.build_config (as mmf_run does), or merge configs/defaults.yaml first."
        )
    return node
