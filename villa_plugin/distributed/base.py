"""The strategy adapter contract: everything the trainer and the free-AT engine need from a
distributed wrapper, so neither ever calls a wrapper's API directly (see docs/distributed.md)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from villa_plugin.registry import registry


class Strategy:
    """Base adapter. Subclasses override what their wrapper does differently.

    - ``wrap(model, make_optimizer)``: wrap the model and build the optimizer in the order the
      wrapper needs; ``make_optimizer(param_groups_or_params) -> Optimizer``.
    - ``sync_context(model, is_last)``: enter around forward *and* backward of every backward pass
      of an update; gradients must only be synchronised when ``is_last`` is True.
    - ``zero_grad``, ``clip_grad_norm`` (global norm), ``grad_scaler``, optimizer state for
      checkpoints, and small collectives for metrics/logging.
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
    def wrap(self, model: nn.Module, make_optimizer: Callable[[Any], torch.optim.Optimizer]) -> Tuple[nn.Module, torch.optim.Optimizer]:
        optimizer = make_optimizer(_param_groups(model, self.config))
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
