"""Optimizers, parameter groups and learning-rate schedules as UNITER/VILLA fine-tuning uses them.

- ``AdamW``: the HF/UNITER variant (registered ``adamw_hf`` and MMF's ``adam_w``).
- ``build_param_groups``: the no-decay substring rule and per-module lr multipliers; each group
  carries ``lr_mult``.
- Schedules (registered ``warmup_linear``, ``warmup_cosine``, ``constant``) set every group's lr to
  ``base_lr × factor(update) × lr_mult`` for the coming update, as the reference does each step.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import RegistryError, registry


# -- optimizer ------------------------------------------------------------------------------
def run_closure(closure) -> Optional[torch.Tensor]:
    """An optimizer step's ``closure`` re-evaluated with gradients on (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def adam_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Dict[str, Any]:
    """``p``'s Adam state (``step`` 0 and zero ``exp_avg`` / ``exp_avg_sq`` on first use); sparse
    gradients are refused. Shared by :class:`AdamW` and LXMERT's ``BertAdam``."""
    if p.grad.is_sparse:
        raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
    state = optimizer.state[p]
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


@registry.register_optimizer("adamw_hf")
@registry.register_optimizer("adam_w")
class AdamW(torch.optim.Optimizer):
    """AdamW as in HF transformers' old ``AdamW`` (UNITER ``optim/adamw.py``).

    Differs from ``torch.optim.AdamW``: ``eps`` is added to ``sqrt(v)`` before bias correction (the
    correction is folded into the step size ``lr·sqrt(1-β2^t)/(1-β1^t)``), and the decoupled decay
    ``p -= lr·wd·p`` is applied after the Adam update, on the updated ``p``.

    ``foreach`` (``None``: when the group's parameters are on CUDA) runs each group's update with
    torch's multi-tensor ``_foreach_*`` ops (a few kernel launches instead of ~8 per parameter);
    the arithmetic is the per-parameter loop's, op for op.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        foreach: Optional[bool] = None,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {tuple(betas)} (each must be in [0, 1))")
        if eps < 0.0:
            raise ValueError(f"Invalid eps: {eps} (must be >= 0)")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        self.foreach = foreach  # not a group default: saved optimizer states stay as they were

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            foreach = self.foreach if self.foreach is not None else all(p.is_cuda for p in params)
            if foreach and params:
                self._foreach_group_step(group, params)
                continue
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state, step_size = self._advance(p, group)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    def _advance(self, p: torch.Tensor, group: Dict[str, Any]):
        """``p``'s state (created on first use) with its step counted, and this step's size."""
        state = adam_state(self, p)
        state["step"] += 1
        step_size = group["lr"]
        if group["correct_bias"]:
            beta1, beta2 = group["betas"]
            step = state["step"]
            step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return state, step_size

    def _foreach_group_step(self, group: Dict[str, Any], params: List[torch.Tensor]) -> None:
        """The loop's update for one group, as multi-tensor ops."""
        beta1, beta2 = group["betas"]
        grads, exp_avgs, exp_avg_sqs, step_sizes = [], [], [], []
        for p in params:
            state, step_size = self._advance(p, group)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            step_sizes.append(-step_size)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _section(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if config is not None and hasattr(config, "get") else default
    return _plain(value)


def optimizer_class(name: str):
    """A registered optimizer, else ``torch.optim.<name>``; unknown names raise RegistryError."""
    try:
        return registry.get_optimizer_class(name)
    except RegistryError as error:
        candidate = getattr(torch.optim, str(name), None)
        if isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
            return candidate
        raise RegistryError(f"{error} torch.optim class names (e.g. AdamW, SGD) are accepted too.") from None


def build_param_groups(model: nn.Module, optimizer_config: Any) -> List[Dict[str, Any]]:
    """Trainable parameters split by (lr multiplier, decay), as UNITER's VQA/VCR groups.

    A parameter is not decayed when its name **contains** any of ``optimizer.no_decay``; its lr
    multiplier is that of the longest ``optimizer.lr_multipliers`` prefix naming one of its parent
    modules (or itself). Groups come multiplier-groups first, in config order, each as [decay,
    no-decay], then the rest; empty groups are dropped.
    """
    no_decay = [str(s) for s in (_section(optimizer_config, "no_decay") or [])]
    multipliers = {str(k): float(v) for k, v in (_section(optimizer_config, "lr_multipliers") or {}).items()}
    weight_decay = float((_section(optimizer_config, "params") or {}).get("weight_decay", 0.0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix in multipliers:
        if not any(_under(n, prefix) for n in names):
            raise ConfigError(
                f'optimizer.lr_multipliers names "{prefix}", which is no module of {type(model).__name__} '
                f"with trainable parameters. Top-level modules: {sorted({n.split('.')[0] for n in names})}"
            )
    order = list(dict.fromkeys(list(multipliers.values()) + [1.0]))
    buckets: Dict[tuple, List[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matches = [p for p in multipliers if _under(name, p)]
        mult = multipliers[max(matches, key=len)] if matches else 1.0
        decay = not any(nd in name for nd in no_decay)
        buckets.setdefault((mult, decay), []).append(param)
    groups = []
    for mult in order:
        for decay in (True, False):
            params = buckets.get((mult, decay))
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult})
    return groups


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def build_optimizer(params: Any, optimizer_config: Any) -> torch.optim.Optimizer:
    """``optimizer.type`` with ``optimizer.params`` over ``params`` (groups or tensors)."""
    name = _section(optimizer_config, "type", "adamw_hf")
    kwargs = dict(_section(optimizer_config, "params") or {})
    if "betas" in kwargs:
        kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])
    cls = optimizer_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        # optimizer.params merges with the AdamW defaults (betas, eps...): drop what cls does not take
        dropped = sorted(k for k in kwargs if k not in accepted)
        if dropped:
            logging.getLogger(__name__).warning(f"optimizer {name} takes no {dropped}; ignoring these optimizer.params")
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    try:
        return cls(params, **kwargs)
    except TypeError as error:
        raise ConfigError(f"optimizer.params do not fit optimizer {name} ({cls.__name__}): {error}") from None


# -- schedules ------------------------------------------------------------------------------
class Schedule:
    """Sets ``lr = base_lr × factor(update) × group["lr_mult"]`` on every group.

    ``factor(n)`` is the multiplier for update ``n`` (1-based). The lr for update 1 is set at
    construction; ``step()`` (after each optimizer step) sets the lr of the next update, so update
    ``n`` always runs with ``factor(n)``, as the reference that increments ``global_step`` first.
    An lr ≤ 0 becomes 1e-8 (before ``lr_mult``), as in the reference. State: plain numbers.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup_steps: int = 0, num_training_steps: Optional[int] = None):
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps or 0)
        self.num_training_steps = int(num_training_steps) if num_training_steps is not None else None
        self.last_step = 0  # updates completed
        self._apply()

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        lr = self.base_lr * self.factor(step)
        return lr if lr > 0 else 1e-8

    @property
    def current_lr(self) -> float:
        """Base lr (before ``lr_mult``) the next update uses."""
        return self.lr_at(self.last_step + 1)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.current_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_mult", 1.0))

    def get_last_lr(self) -> List[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step, "base_lr": self.base_lr}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()

    def _need_total(self) -> int:
        if self.num_training_steps is None or self.num_training_steps <= 0:
            raise ConfigError(
                f"scheduler {type(self).__name__} needs scheduler.params.num_training_steps > 0 "
                f"(got {self.num_training_steps}); set it or training.max_updates"
            )
        return self.num_training_steps


class WarmupThenDecay(Schedule):
    """``step/warmup`` while ``step < warmup``, then ``decay(step, T)`` until ``T``, and 0 after."""

    def factor(self, step: int) -> float:
        total = self._need_total()
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if step >= total:
            return 0.0
        return self.decay(step, total)

    def decay(self, step: int, total: int) -> float:
        raise NotImplementedError


@registry.register_scheduler("warmup_linear")
class WarmupLinear(WarmupThenDecay):
    """``step/warmup`` while ``step < warmup``, then ``max(0, (T-step)/(T-warmup))``."""

    def decay(self, step: int, total: int) -> float:
        return max(0.0, (total - step) / (total - self.warmup_steps))


@registry.register_scheduler("warmup_cosine")
class WarmupCosine(WarmupThenDecay):
    """Linear warmup, then half a cosine from 1 to 0 at ``T``."""

    def decay(self, step: int, total: int) -> float:
        progress = (step - self.warmup_steps) / (total - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


@registry.register_scheduler("constant")
class Constant(Schedule):
    """Linear warmup (if ``warmup_steps``), then the base lr; ``num_training_steps`` is ignored."""

    def factor(self, step: int) -> float:
        return step / self.warmup_steps if step < self.warmup_steps else 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: Any, num_training_steps: Optional[int] = None) -> Schedule:
    """``scheduler.type`` with ``scheduler.params``; base lr from ``optimizer.params.lr``.

    ``num_training_steps`` fills ``scheduler.params.num_training_steps`` when that is null.
    """
    scheduler_config = _section(config, "scheduler") or {}
    params = dict(scheduler_config.get("params") or {})
    if params.get("num_training_steps") is None:
        params["num_training_steps"] = num_training_steps
    base_lr = (_section(config, "optimizer") or {}).get("params", {}).get("lr")
    if base_lr is None:
        raise ConfigError("optimizer.params.lr is not set; the schedule needs a base learning rate")
    cls = registry.get_scheduler_class(scheduler_config.get("type", "constant"))
    try:
        return cls(optimizer, base_lr=float(base_lr), **params)
    except TypeError as error:
        raise ConfigError(f"scheduler.params do not fit scheduler {scheduler_config.get('type')}: {error}") from None
