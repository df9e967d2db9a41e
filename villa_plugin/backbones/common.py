"""Set-up pieces every backbone's architecture config needs: unknown keys and the attention shape."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from villa_plugin.common.errors import ConfigError

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def check_config_keys(config_class: type, values: Mapping[str, Any], source: str, model_name: str) -> None:
    """A ConfigError naming ``source``, the unknown keys and the known ones when ``values`` holds a key
    that is not a field of the dataclass ``config_class``."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {model_name} config key(s) {unknown}; known keys: {sorted(known)}.")


def check_attention_shape(config: Any, prefix: str = "", implementations: Sequence[str] = ATTN_IMPLEMENTATIONS) -> None:
    """``hidden_size`` divisible by ``num_attention_heads`` and a known ``attn_implementation``
    (``prefix`` starts each message, e.g. ``"LXMERT "``)."""
    if config.hidden_size % config.num_attention_heads != 0:
        raise ConfigError(
            f"{prefix}hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
            f"({config.num_attention_heads})."
        )
    if config.attn_implementation not in implementations:
        raise ConfigError(
            f'{prefix}attn_implementation must be one of {tuple(implementations)}, got "{config.attn_implementation}".'
        )
