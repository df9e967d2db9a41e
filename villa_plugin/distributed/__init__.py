"""One :class:`Strategy` adapter per ``distributed.strategy`` (see docs/distributed.md)."""
from __future__ import annotations

import logging
from typing import Any

from villa_plugin.distributed.base import (  # noqa: F401
    OptimizerSpec,
    SingleProcessStrategy,
    Strategy,
    as_optimizer_spec,
    _dist_ready,
    config_value,
)
from villa_plugin.distributed import ddp, fairscale_fsdp, fairscale_sddp, fsdp2, zero  # noqa: F401,E402

logger = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fairscale_sddp", "fairscale_fsdp", "zero", "fsdp2")
# strategies that optimizer.enable_state_sharding=true (MMF's switch) may turn into fairscale_sddp
_SHARDING_ALIAS_FROM = ("none", "ddp", "fairscale_sddp")


def resolve_strategy_name(config: Any) -> str:
    """``distributed.strategy`` with MMF's ``optimizer.enable_state_sharding=true`` applied as an
    alias of ``fairscale_sddp`` (from ``none`` or ``ddp``, as in MMF); it conflicts with the other
    sharding strategies, which already shard the optimizer state their own way. A one-process run
    (no process group) keeps ``none``."""
    name = str(config_value(config, "distributed.strategy", "none"))
    if not bool(config_value(config, "optimizer.enable_state_sharding", False)):
        return name
    if name == "none" and not _dist_ready():
        return name  # one process: nothing to shard (MMF ignores the switch too)
    if name not in _SHARDING_ALIAS_FROM:
        from villa_plugin.common.errors import ConfigError

        raise ConfigError(
            f"optimizer.enable_state_sharding=true is MMF's switch for distributed.strategy=fairscale_sddp, "
            f"but distributed.strategy={name}. Set one of them: drop enable_state_sharding to use {name}, "
            f"or set distributed.strategy=fairscale_sddp."
        )
    if name != "fairscale_sddp":
        logger.info("optimizer.enable_state_sharding=true: using distributed.strategy=fairscale_sddp")
    return "fairscale_sddp"


def build_strategy(config: Any, device: Any = None) -> Strategy:
    """The registered strategy for :func:`resolve_strategy_name`, constructed for ``device``."""
    from villa_plugin.registry import registry

    return registry.get_strategy_class(resolve_strategy_name(config))(config, device)
