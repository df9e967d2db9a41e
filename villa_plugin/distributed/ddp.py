"""``distributed.strategy=ddp``: torch DistributedDataParallel, optimizer built after wrapping.

DDP averages gradients across ranks on the backward that runs with sync enabled; the free-AT
engine's K backward passes per update run under ``no_sync`` except the last one (correct either
way, the context only saves K-1 all-reduces per micro-batch). ``device_ids`` is None on CPU (gloo).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from villa_plugin.distributed.base import (
    OptimizerFactory,
    Strategy,
    _param_groups,
    build_optimizer,
    config_value,
    no_sync_unless,
    require_process_group,
)
from villa_plugin.registry import registry


def ddp_wrap(model: nn.Module, device: torch.device, config: Any) -> nn.Module:
    """DistributedDataParallel on ``device`` (``device_ids`` only for CUDA); broadcasts rank 0's
    parameters and buffers."""
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=device_ids,
        find_unused_parameters=bool(config_value(config, "distributed.find_unused_parameters", False)),
    )


@registry.register_strategy("ddp")
class DDPStrategy(Strategy):
    """DistributedDataParallel; gradients replicated after the sync, so the local norm is global."""

    name = "ddp"

    def __init__(self, config: Any = None, device: Optional[torch.device] = None):
        super().__init__(config, device)
        require_process_group(self.name)

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Tuple[nn.Module, torch.optim.Optimizer]:
        wrapped = ddp_wrap(model, self.device, self.config)
        optimizer = build_optimizer(make_optimizer(_param_groups(model, self.config)))
        return wrapped, optimizer

    def sync_context(self, model: nn.Module, is_last: bool):
        return no_sync_unless(model, is_last)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        return optimizer.state_dict() if self.is_main else None
