"""``distributed.strategy=fairscale_sddp`` (MMF's ``optimizer.enable_state_sharding=true``):
fairscale OSS (sharded optimizer state) + ShardedDataParallel (each gradient reduced to its owner).

The adapter avoids the traps of distributed.md §4:

1. ``zero_grad`` goes through ``model.zero_grad()`` (never ``set_to_none=True``, which breaks
   ShardedDDP's bucket views and silently corrupts updates from the second step on);
2. every backward but the update's last runs under ``model.no_sync()`` (ShardedDDP reduces on
   every backward and would double-count the K free-AT backward passes);
3. clipping uses ``OSS.clip_grad_norm`` (torch's ``clip_grad_norm_`` sees only per-rank partial norms);
4. checkpoints: ``consolidate_state_dict(recipient_rank=0)`` on every rank, then rank 0's
   ``state_dict()`` (the single-process layout);
5. fp16 uses fairscale's ``ShardedGradScaler`` (its torch FutureWarning is filtered);
7. construction order: the OSS optimizer first, then ``ShardedDataParallel(model, optimizer)``.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.distributed.base import (
    OptimizerFactory,
    Strategy,
    _param_groups,
    as_optimizer_spec,
    config_value,
    no_sync_unless,
    require_process_group,
)
from villa_plugin.registry import registry

DEFAULT_REDUCE_BUFFER_SIZE = 2**23  # fairscale's default bucket size (elements)


def import_fairscale(strategy: str):
    """``fairscale`` or a ConfigError saying how to install it or what to use instead."""
    try:
        import fairscale  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"distributed.strategy={strategy} needs fairscale, which is not installed. Install it with "
            f"`pip install 'villa_plugin[distributed]'` (fairscale==0.4.13, after torch), or use the native "
            f"equivalents: distributed.strategy=zero (= OSS) or fsdp2."
        ) from None
    return fairscale


@registry.register_strategy("fairscale_sddp")
class FairscaleShardedDDPStrategy(Strategy):
    """OSS + ShardedDataParallel with no_sync, non-None zero_grad, OSS clipping and consolidation."""

    name = "fairscale_sddp"

    def __init__(self, config: Any = None, device: Optional[torch.device] = None):
        super().__init__(config, device)
        require_process_group(self.name)
        import_fairscale(self.name)

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Tuple[nn.Module, torch.optim.Optimizer]:
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim.oss import OSS

        spec = as_optimizer_spec(make_optimizer(_param_groups(model, self.config)))
        fp16 = str(config_value(self.config, "training.precision", "fp32")) == "fp16"
        optimizer = OSS(spec.param_groups, optim=spec.cls, broadcast_fp16=fp16, **spec.kwargs)
        buffer = int(config_value(self.config, "distributed.sddp_reduce_buffer_size", DEFAULT_REDUCE_BUFFER_SIZE))
        wrapped = ShardedDataParallel(model, optimizer, reduce_buffer_size=buffer)
        return wrapped, optimizer

    def sync_context(self, model: nn.Module, is_last: bool):
        return no_sync_unless(model, is_last)

    def zero_grad(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.zero_grad(set_to_none=False)

    def clip_grad_norm(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        return optimizer.clip_grad_norm(max_norm)

    def grad_scaler(self, precision: str):
        if precision != "fp16" or self.device.type != "cuda":
            return None
        from fairscale.optim.grad_scaler import ShardedGradScaler

        with warnings.catch_warnings():
            # fairscale 0.4.13 builds torch.cuda.amp.GradScaler(args...), deprecated on torch 2.x.
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*GradScaler.*deprecated.*")
            return ShardedGradScaler()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        optimizer.consolidate_state_dict(recipient_rank=0)  # a collective: every rank calls it
        return optimizer.state_dict() if self.is_main else None
