"""BertAdam as LXMERT's fine-tuning runs it (lxmert.md §7); not torch's Adam/AdamW nor UNITER's AdamW.

Per parameter with a gradient (``.grad is None``: no update, no decay, no step count):

1. ``m ← b1·m + (1−b1)·g``, ``v ← b2·v + (1−b2)·g²``;
2. ``u = m / (√v + e)`` — **no bias correction**;
3. ``u += weight_decay · p`` for **every** parameter (LayerNorm and biases included);
4. ``p ← p − lr · s(step / t_total) · u`` with ``step`` counted from **0**, so the first update has
   lr 0 when ``warmup > 0``; ``t_total = -1`` means a constant lr (use that when an external
   scheduler sets the group lr, or the two schedules multiply);
5. ``s(x) = x / warmup`` while ``x < warmup``, else ``max((x − 1) / (warmup − 1), 0)``.

Gradient clipping is not part of the optimizer (the reference clips the total norm to 5.0 before
``step``).

Registered as optimizer ``bert_adam`` (``betas`` / ``eps``, MMF's names, are accepted for ``b1, b2``
/ ``e``) and scheduler ``bert_warmup_linear``: the plugin's ``warmup_linear`` one update late, so
update ``n`` runs with the official factor ``s((n − 1) / T)`` (update 1: lr 0, which the plugin's
schedules floor at 1e-8). With the scheduler, keep ``t_total: -1`` so the two schedules do not
multiply. Official LXMERT runs: ``optimizer.no_decay: []`` (decay on every parameter), ``warmup_steps``
= 10 % of ``max_updates``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from villa_plugin.optim import WarmupLinear, adam_state, run_closure
from villa_plugin.registry import registry


def warmup_linear(x: float, warmup: float) -> float:
    """The reference's ``warmup_linear`` schedule factor at training progress ``x = step / t_total``."""
    if x < warmup:
        return x / warmup
    return max((x - 1.0) / (warmup - 1.0), 0.0)


@registry.register_optimizer("bert_adam")
class BertAdam(torch.optim.Optimizer):
    """``BertAdam(params, lr, warmup=0.1, t_total=-1, b1=0.9, b2=0.999, e=1e-6, weight_decay=0.01)``;
    ``betas=(b1, b2)`` and ``eps=e`` win over ``b1, b2, e`` when given."""

    def __init__(self, params, lr: float, warmup: float = 0.1, t_total: int = -1, b1: float = 0.9,
                 b2: float = 0.999, e: float = 1e-6, weight_decay: float = 0.01,
                 betas: Optional[Sequence[float]] = None, eps: Optional[float] = None):
        if betas is not None:
            b1, b2 = (float(b) for b in betas)
        if eps is not None:
            e = float(eps)
        if not lr >= 0.0:
            raise ValueError(f"BertAdam lr must be >= 0, got {lr}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"BertAdam warmup is a fraction of t_total in [0, 1), got {warmup}")
        if t_total != -1 and t_total <= 0:
            raise ValueError(f"BertAdam t_total must be a positive step count or -1 (no schedule), got {t_total}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0 and e >= 0.0 and weight_decay >= 0.0):
            raise ValueError(f"BertAdam needs 0 <= b1, b2 < 1 and e, weight_decay >= 0; got {b1}, {b2}, {e}, {weight_decay}")
        defaults = dict(lr=lr, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def scheduled_lr(self, group, step: int) -> float:
        """The lr of ``group`` at the parameter's ``step`` (counted from 0)."""
        if group["t_total"] == -1:
            return group["lr"]
        return group["lr"] * warmup_linear(step / group["t_total"], group["warmup"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = adam_state(self, p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                grad = p.grad
                exp_avg.mul_(group["b1"]).add_(grad, alpha=1.0 - group["b1"])
                exp_avg_sq.mul_(group["b2"]).addcmul_(grad, grad, value=1.0 - group["b2"])
                update = exp_avg / (exp_avg_sq.sqrt() + group["e"])
                if group["weight_decay"] > 0.0:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-self.scheduled_lr(group, state["step"]))
                state["step"] += 1
        return loss


@registry.register_scheduler("bert_warmup_linear")
class BertWarmupLinear(WarmupLinear):
    """The official BertAdam schedule (steps counted from 0): update ``n`` gets ``warmup_linear``'s
    factor of update ``n − 1``, so the first update has lr 0 (floored at 1e-8)."""

    def factor(self, step: int) -> float:
        return super().factor(step - 1)


__all__ = ["BertAdam", "BertWarmupLinear", "warmup_linear"]
