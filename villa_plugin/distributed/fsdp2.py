"""``distributed.strategy=fsdp2``: native per-parameter sharding (``fully_shard``), the supported
successor of fairscale FSDP; works on a CPU mesh with gloo and with ``torch.compile``.

- Each transformer layer (found by :func:`transformer_layers`) and then the root are
  ``fully_shard``-ed; the optimizer is built AFTER, over the sharded (DTensor) parameters.
- Rank 0's parameters and buffers are broadcast first: ``fully_shard`` keeps each rank's own
  shard of its local initialisation and would not notice ranks that differ.
- ``sync_context``: ``set_requires_gradient_sync(is_last)`` (FSDP2's no_sync).
- ``clip_grad_norm``: torch ``clip_grad_norm_`` over DTensors gives the global norm.
- Checkpoints: ``torch.distributed.checkpoint.state_dict`` full (consolidated) state on rank 0,
  converted to the single-process layout (integer parameter ids) so any strategy can resume it.
- ``training.precision=bf16`` adds ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from villa_plugin.distributed.base import (
    OptimizerFactory,
    Strategy,
    _param_groups,
    broadcast_module,
    build_optimizer,
    config_value,
    require_process_group,
)
from villa_plugin.distributed.sharding_units import transformer_layers
from villa_plugin.registry import registry


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """FSDP2's no_sync: gradients stay unsharded and local until a backward with sync enabled."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A DTensor norm as a plain tensor (the norm is already global)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@registry.register_strategy("fsdp2")
class FSDP2Strategy(Strategy):
    """``fully_shard`` per transformer layer + root; DCP full state dicts for checkpoints."""

    name = "fsdp2"

    def __init__(self, config: Any = None, device: Optional[torch.device] = None):
        super().__init__(config, device)
        require_process_group(self.name)
        self.model: Optional[nn.Module] = None

    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if str(config_value(self.config, "training.precision", "fp32")) == "bf16":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        broadcast_module(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        reshard = bool(config_value(self.config, "distributed.fsdp_reshard_after_forward", True))
        policy = self.mp_policy()
        for layer in transformer_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        self.model = model
        optimizer = build_optimizer(make_optimizer(_param_groups(model, self.config)))
        return model, optimizer

    def sync_context(self, model: nn.Module, is_last: bool):
        return gradient_sync(model, is_last)

    def clip_grad_norm(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def grad_scaler(self, precision: str):
        if precision == "fp16" and self.device.type == "cuda":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler()
        return None

    # -- checkpoints ----------------------------------------------------------------------
    def _options(self, **kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def model_state_dict(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=self._options(cpu_offload=True))
        return state if self.is_main else None

    def load_model_state_dict(self, model: nn.Module, state: Dict[str, Any], strict: bool = True):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        return set_model_state_dict(model, state, options=self._options(strict=strict))

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if not optimizer.state:
            # Nothing sharded to gather. (DCP would run a zero-lr step to create the state.)
            return optimizer.state_dict() if self.is_main else None
        full = get_optimizer_state_dict(self._wrapped(), optimizer, options=self._options(cpu_offload=True))
        return fqn_to_index_layout(full) if self.is_main else None

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if not state.get("state"):
            optimizer.load_state_dict(state)
            return
        keyed = index_to_fqn_layout(state, self._wrapped(), optimizer)
        set_optimizer_state_dict(self._wrapped(), optimizer, keyed, options=self._options())

    def _wrapped(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("fsdp2: call wrap(model, make_optimizer) before using optimizer state.")
        return self.model


def fqn_to_index_layout(full: Dict[str, Any]) -> Dict[str, Any]:
    """DCP's parameter-name keyed optimizer state -> ``Optimizer.state_dict()``'s integer ids (the
    position of the parameter across the param groups, as DCP itself numbers them)."""
    index: Dict[str, int] = {}
    for group in full["param_groups"]:
        for fqn in group["params"]:
            index[fqn] = len(index)
    return {
        "state": {index[fqn]: value for fqn, value in full["state"].items()},
        "param_groups": [dict(group, params=[index[f] for f in group["params"]]) for group in full["param_groups"]],
    }


def index_to_fqn_layout(state: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The inverse of :func:`fqn_to_index_layout` for ``optimizer``'s parameters of ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = sum(len(group["params"]) for group in state["param_groups"])
    if saved != len(fqns) or len(state["param_groups"]) != len(optimizer.param_groups):
        from villa_plugin.common.errors import CheckpointError

        raise CheckpointError(
            f"The optimizer state holds {len(state['param_groups'])} groups / {saved} parameters but the "
            f"optimizer has {len(optimizer.param_groups)} / {len(fqns)}: it was saved for another model or "
            f"optimizer config. Set checkpoint.reset.optimizer=true to resume without it."
        )
    return {
        "state": {fqns[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [dict(group, params=[fqns[int(i)] for i in group["params"]]) for group in state["param_groups"]],
    }
