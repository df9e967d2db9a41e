"""VILLA's symmetric KL between clean and perturbed predictions and its per-task reductions.

The KL term is added by the engine (:mod:`villa_plugin.adversarial.engine`), which holds the
clean logits; it is not a YAML loss (a model output has no clean logits to compare with), so
``model_config.<model>.losses`` lists only the task loss and ``adv_kl_weight`` sets α.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from villa_plugin.common.errors import ConfigError


def symmetric_kl(adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(p_c‖p_adv) + KL(p_adv‖p_c)`` over softmax probabilities, in fp32.

    The official ``kl_div(log_softmax(z), p_c) + kl_div(log p_c, softmax(z))`` (``reduction='none'``)
    is ``p_c·(log p_c − log p) + p·(log p − log p_c)``, computed here in the factored form
    ``(p_c − p)·(log p_c − log p)`` with log-softmax for both logs: mathematically identical, but
    exactly 0 (value and gradient) when both logits are equal and never negative from round-off
    (``kl_div`` takes ``log(softmax)``, which differs from ``log_softmax`` by rounding). The result
    has the logits' shape ``[rows, C]``; gradients flow into both arguments unless one is detached.
    """
    logp_adv = F.log_softmax(adv_logits.float(), dim=-1)
    logp_clean = F.log_softmax(clean_logits.float(), dim=-1)
    return (logp_clean.exp() - logp_adv.exp()) * (logp_clean - logp_adv)


def _mean_times_classes(kl: torch.Tensor) -> torch.Tensor:
    # VQA / SNLI-VE: kl.mean() * C = sum over classes, mean over rows.
    return kl.mean() * kl.size(-1)


def _sum_classes_mean(kl: torch.Tensor) -> torch.Tensor:
    # NLVR2: sum over classes, mean over rows.
    return kl.sum(-1).mean()


def _mean(kl: torch.Tensor) -> torch.Tensor:
    # VCR: mean over rows and classes (half of the sum-over-classes value for 2 classes).
    return kl.mean()


KL_REDUCTIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean_times_classes": _mean_times_classes,
    "sum_classes_mean": _sum_classes_mean,
    "mean": _mean,
}


def get_kl_reduction(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reduction function for ``name`` (``mean_times_classes`` | ``sum_classes_mean`` | ``mean``)."""
    try:
        return KL_REDUCTIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"Unknown KL reduction {name!r}; use one of {', '.join(KL_REDUCTIONS)} "
            f"(VQA/VE: mean_times_classes, NLVR2: sum_classes_mean, VCR: mean)."
        ) from None


def reduce_kl(kl: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce an elementwise ``[rows, C]`` KL to a scalar by the task's convention."""
    return get_kl_reduction(reduction)(kl)
