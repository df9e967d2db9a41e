"""The strategy adapter contract: everything the trainer and the free-AT engine need from a
distributed wrapper, so neither ever calls a wrapper's API directly (see docs/distributed.md)."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from villa_plugin.registry import registry
from villa_plugin.common.config_access import config_value  # noqa: F401  (re-exported)


@dataclass
class OptimizerSpec:
    """What it takes to build an optimizer: its class, parameter groups and constructor kwargs.

    Sharding optimizers (fairscale OSS, torch ZeroRedundancyOptimizer) build the real optimizer
    themselves from the class and kwargs, so ``make_optimizer`` may return this instead of an
    instance; an instance is turned into a spec with :meth:`from_optimizer`.
    """

    cls: type
    param_groups: List[Dict[str, Any]]
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def build(self, param_groups: Optional[Iterable] = None) -> torch.optim.Optimizer:
        return self.cls(self.param_groups if param_groups is None else param_groups, **self.kwargs)

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> "OptimizerSpec":
        """The spec of an existing (still state-free) optimizer: its groups keep per-group settings
        (lr, weight_decay, lr_mult, ...); kwargs are its ``defaults`` the constructor accepts."""
        opt_cls = type(optimizer)
        signature = inspect.signature(opt_cls.__init__)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        kwargs = {k: v for k, v in optimizer.defaults.items() if takes_any or k in signature.parameters}
        return cls(opt_cls, [dict(group) for group in optimizer.param_groups], kwargs)


OptimizerFactory = Callable[[Any], Union[torch.optim.Optimizer, OptimizerSpec]]


def as_optimizer_spec(made: Union[torch.optim.Optimizer, OptimizerSpec]) -> OptimizerSpec:
    """``make_optimizer``'s result as an :class:`OptimizerSpec`."""
    if isinstance(made, OptimizerSpec):
        return made
    if isinstance(made, torch.optim.Optimizer):
        return OptimizerSpec.from_optimizer(made)
    raise TypeError(
        f"make_optimizer must return a torch.optim.Optimizer or an OptimizerSpec, got {type(made).__name__}."
    )


def build_optimizer(made: Union[torch.optim.Optimizer, OptimizerSpec]) -> torch.optim.Optimizer:
    """``make_optimizer``'s result as an optimizer instance."""
    return made if isinstance(made, torch.optim.Optimizer) else as_optimizer_spec(made).build()


class Strategy:
    """Base adapter. Subclasses override what their wrapper does differently.

    - ``wrap(model, make_optimizer)``: wrap the model and build the optimizer in the order the
      wrapper needs; ``make_optimizer(param_groups_or_params)`` returns an ``Optimizer`` or an
      :class:`OptimizerSpec` (sharding optimizers rebuild it from its class and kwargs).
    - ``sync_context(model, is_last)``: enter around forward *and* backward of every backward pass
      of an update; gradients must only be synchronised when ``is_last`` is True.
    - ``zero_grad``, ``clip_grad_norm`` (global norm), ``grad_scaler``, model and optimizer
      state for checkpoints (full, consolidated, in the single-process layout, so a checkpoint
      resumes under any strategy and world size), and small collectives for metrics/logging.
    """

    name = "base"

    def __init__(self, config: Any = None, device: Optional[torch.device] = None):
        self.config = config
        self.device = device or torch.device("cpu")

    # -- process group facts ------------------------------------------------------------
    @property
    def rank(self) -> int:
        return torch.distributed.get_rank() if _dist_ready() else 0

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size() if _dist_ready() else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- wrapping -------------------------------------------------------------------------
    def wrap(self, model: nn.Module, make_optimizer: OptimizerFactory) -> Tuple[nn.Module, torch.optim.Optimizer]:
        optimizer = build_optimizer(make_optimizer(_param_groups(model, self.config)))
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def sync_context(self, model: nn.Module, is_last: bool):
        return contextlib.nullcontext()

    # -- update mechanics -----------------------------------------------------------------
    def zero_grad(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def grad_scaler(self, precision: str):
        """A GradScaler for fp16 on CUDA, else None (bf16 and fp32 need none)."""
        if precision == "fp16" and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    # -- checkpoints ----------------------------------------------------------------------
    def model_state_dict(self, model: nn.Module) -> Optional[Dict[str, Any]]:
        """Full model state (unwrapped key names) on rank 0, None elsewhere. Call on every rank."""
        state = self.unwrap(model).state_dict()
        return state if self.is_main else None

    def load_model_state_dict(self, model: nn.Module, state: Dict[str, Any], strict: bool = True):
        """Load a full model state (every rank passes the same dict)."""
        return self.unwrap(model).load_state_dict(state, strict=strict)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        """Full optimizer state on rank 0 (None elsewhere). Must be called on every rank."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    # -- collectives ----------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _param_groups(model: nn.Module, config: Any) -> Iterable:
    base = getattr(model, "module", model)
    getter = getattr(base, "get_optimizer_parameters", None)
    optimizer_config = config.get("optimizer") if config is not None and hasattr(config, "get") else None
    return getter(optimizer_config) if getter else [p for p in base.parameters() if p.requires_grad]


@registry.register_strategy("none")
class SingleProcessStrategy(Strategy):
    """One process, no wrapper."""

    name = "none"


def require_process_group(strategy: str) -> None:
    """Fail clearly when a distributed strategy is used without ``torch.distributed`` set up."""
    if not _dist_ready():
        from villa_plugin.common.errors import ConfigError

        raise ConfigError(
            f"distributed.strategy={strategy} needs a process group, but torch.distributed is not "
            f"initialised. Launch with `torchrun --nproc_per_node=N -m villa_plugin.cli config=...` "
            f"(villa_plugin.distributed.launch.setup reads its environment), or set "
            f"distributed.strategy=none for one process."
        )


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            torch.distributed.broadcast(tensor.data, src)


def no_sync_unless(model: nn.Module, is_last: bool):
    """``model.no_sync()`` unless this is the update's last backward (DDP-style wrappers)."""
    return contextlib.nullcontext() if is_last else model.no_sync()
