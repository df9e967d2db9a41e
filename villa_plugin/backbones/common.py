"""Set-up pieces every backbone needs: config keys, the attention shape, the pre-trained file's path."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from villa_plugin.common.errors import CheckpointError, ConfigError

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


def existing_checkpoint(key: str, checkpoint: str) -> str:
    """The expanded path of ``key`` = ``checkpoint`` (a ``pretrained_checkpoint`` setting); a
    CheckpointError naming the key and the resolved path when no such file exists."""
    path = os.path.expanduser(str(checkpoint))
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{key} = {checkpoint}: file not found (resolved to {os.path.abspath(path)}). Fix the path, or set "
            f"it to \"\" to start from random weights."
        )
    return path
