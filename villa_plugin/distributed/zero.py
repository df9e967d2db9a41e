"""``distributed.strategy=zero``: DDP + torch ``ZeroRedundancyOptimizer`` (ZeRO-1, the native
equivalent of fairscale OSS): each rank keeps the optimizer state of its own parameter shard.

Gradients are replicated by DDP, so torch's ``clip_grad_norm_`` sees the global norm. The full
state for a checkpoint is consolidated on rank 0 (``consolidate_state_dict(to=0)`` on every rank).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from villa_plugin.distributed.base import OptimizerFactory, _param_groups, as_optimizer_spec
from villa_plugin.distributed.ddp import DDPStrategy, ddp_wrap
from villa_plugin.registry import registry


@registry.register_strategy("zero")
class ZeroStrategy(DDPStrategy):
    """DDP for gradients, ZeroRedundancyOptimizer for sharded optimizer state."""

    name = "zero"

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        wrapped = ddp_wrap(model, self.device, self.config)
        spec = as_optimizer_spec(make_optimizer(_param_groups(model, self.config)))
        optimizer = ZeroRedundancyOptimizer(spec.param_groups, optimizer_class=spec.cls, **spec.kwargs)
        return wrapped, optimizer

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if self.is_main else None
