"""``distributed.strategy=fairscale_fsdp``: fairscale's FullyShardedDataParallel (legacy, GPU
only: on CPU it fails with "Torch not compiled with CUDA enabled"). Prefer ``fsdp2``.

- Each transformer layer, then the root, is wrapped with ``flatten_parameters=False`` so that the
  optimizer keeps UNITER's per-parameter groups (decay / no-decay, lr multipliers); flattening
  would merge them, and fairscale's ``gather_full_optim_state_dict`` supports one group only.
- The full optimizer state for checkpoints is gathered here instead: each state tensor is a
  padded flat shard (``torch.chunk`` of the flattened parameter), all-gathered and reshaped.
- bf16: ``mixed_precision=True, compute_dtype=bfloat16``; fp16: fp16 compute and fairscale's
  ``ShardedGradScaler``; reductions in fp32 in both.
- World size 1 keeps fp32 parameters under bf16/fp16 (a fairscale bug, see ``_fsdp_kwargs``).
- Verified on one GPU only (world size 1); several GPUs are unverified.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.distributed.base import (
    OptimizerFactory,
    Strategy,
    _param_groups,
    broadcast_module,
    build_optimizer,
    config_value,
    no_sync_unless,
    require_process_group,
)
from villa_plugin.distributed.fairscale_sddp import FairscaleShardedDDPStrategy, import_fairscale
from villa_plugin.distributed.sharding_units import transformer_layers
from villa_plugin.registry import registry


@registry.register_strategy("fairscale_fsdp")
class FairscaleFSDPStrategy(Strategy):
    """fairscale FSDP per transformer layer + root, unflattened parameters."""

    name = "fairscale_fsdp"

    def __init__(self, config: Any = None, device: Optional[torch.device] = None):
        super().__init__(config, device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise ConfigError(
                f"distributed.strategy=fairscale_fsdp runs on CUDA only (fairscale's FSDP asserts CUDA), "
                f"but the device is {self.device}. Use distributed.strategy=fsdp2 (native sharding, works on "
                f"CPU with gloo) or fairscale_sddp (sharded optimizer state) instead."
            )
        require_process_group(self.name)
        import_fairscale(self.name)

    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Tuple[nn.Module, torch.optim.Optimizer]:
        from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

        broadcast_module(model)
        groups = _param_groups(model, self.config)  # names of the bare model; FSDP keeps the Parameters
        kwargs = self._fsdp_kwargs()
        for layer in transformer_layers(model):
            _replace_child(model, layer, FSDP(layer, **kwargs))
        wrapped = FSDP(model, **kwargs)
        optimizer = build_optimizer(make_optimizer(groups))
        return wrapped, optimizer

    def _fsdp_kwargs(self) -> Dict[str, Any]:
        precision = str(config_value(self.config, "training.precision", "fp32"))
        kwargs: Dict[str, Any] = dict(
            flatten_parameters=False,
            compute_device=self.device,
            reshard_after_forward=bool(config_value(self.config, "distributed.fsdp_reshard_after_forward", True)),
        )
        if precision in ("bf16", "fp16") and self.world_size > 1:
            # (At world size 1 fairscale 0.4.13 frees its unsharded low-precision copies inside
            # no_sync, so the next forward fails: parameters stay fp32 there, autocast does bf16.)
            kwargs.update(mixed_precision=True, fp32_reduce_scatter=True)
            kwargs["compute_dtype"] = torch.bfloat16 if precision == "bf16" else torch.float16
        return kwargs

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's model (inside FSDP and its FlattenParamsWrapper); its transformer layers stay
        wrapped, so prefer ``model_state_dict`` for parameter names."""
        from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP
        from fairscale.nn.misc import FlattenParamsWrapper

        while isinstance(model, (FSDP, FlattenParamsWrapper)):
            model = model.module
        return model

    def sync_context(self, model: nn.Module, is_last: bool):
        # Required, also at world size 1: without no_sync, fairscale's FSDP reshards after each
        # backward and the final free-AT backward through the clean forward's graph fails.
        return no_sync_unless(model, is_last)

    def clip_grad_norm(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        return model.clip_grad_norm_(max_norm)

    grad_scaler = FairscaleShardedDDPStrategy.grad_scaler

    def model_state_dict(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        state = model.state_dict()  # a collective: full parameters on every rank
        return {k: v.detach().cpu() for k, v in state.items()} if self.is_main else None

    def load_model_state_dict(self, model: nn.Module, state: Dict[str, Any], strict: bool = True):
        return model.load_state_dict(state, strict=strict)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        local = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copy, never edit
        params = [p for group in optimizer.param_groups for p in group["params"]]
        full = {
            index: {key: gather_shard(values[key], params[index], self.world_size) for key in sorted(values)}
            for index, values in sorted(local["state"].items())
        }
        return {"state": full, "param_groups": local["param_groups"]} if self.is_main else None

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        local = {"param_groups": state["param_groups"], "state": {}}
        for index, values in state["state"].items():
            param = params[int(index)]
            local["state"][index] = {k: shard_of(v, param, self.rank, self.world_size) for k, v in values.items()}
        optimizer.load_state_dict(local)


def _is_sharded_like(value: Any, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and getattr(param, "_is_sharded", False) and value.shape == param.shape


def gather_shard(value: Any, param: torch.Tensor, world_size: int) -> Any:
    """The full tensor of a state value sharded like fairscale FSDP shards ``param``."""
    if not _is_sharded_like(value, param):
        return value.detach().cpu() if torch.is_tensor(value) else value
    parts = [torch.empty_like(value) for _ in range(world_size)]
    torch.distributed.all_gather(parts, value.contiguous())
    size = param._orig_size
    return torch.cat(parts)[: size.numel()].view(size).cpu()


def shard_of(value: Any, param: torch.Tensor, rank: int, world_size: int) -> Any:
    """This rank's padded flat shard of a full state value (fairscale FSDP's ``_get_shard``)."""
    if not (torch.is_tensor(value) and getattr(param, "_is_sharded", False) and value.shape == param._orig_size):
        return value
    chunks = list(torch.flatten(value).chunk(world_size))
    while len(chunks) < world_size:
        chunks.append(chunks[0].new_empty(0))
    shard = chunks[rank].clone()
    return F.pad(shard, [0, chunks[0].numel() - shard.numel()])


def _replace_child(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in root.modules():
        for name, child in module.named_children():
            if child is old:
                setattr(module, name, new)  # ModuleList children are named "0", "1", ... too
                return
    raise ValueError("sharding unit not found in the model")
