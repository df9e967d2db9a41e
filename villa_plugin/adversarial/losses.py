"""VILLA's symmetric KL between clean and perturbed predictions, its per-task reductions, and
the registered losses ``symmetric_kl`` and ``villa_adversarial``."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import registry


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


@registry.register_loss("symmetric_kl")
class SymmetricKLLoss(nn.Module):
    """Symmetric KL between ``model_output[scores_key]`` (perturbed) and
    ``model_output[clean_key]`` (clean reference), reduced by ``reduction``.

    YAML: ``{type: symmetric_kl, params: {reduction: mean_times_classes}}``.
    """

    def __init__(self, reduction: str = "mean_times_classes", clean_key: str = "clean_scores", scores_key: str = "scores"):
        super().__init__()
        get_kl_reduction(reduction)  # fail at build time, not at the first batch
        self.reduction = reduction
        self.clean_key = clean_key
        self.scores_key = scores_key

    def forward(self, sample_list: Any, model_output: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.clean_key not in model_output:
            raise KeyError(
                f"symmetric_kl needs the clean logits in model_output[{self.clean_key!r}]; "
                f"the output has {sorted(model_output)}"
            )
        kl = symmetric_kl(model_output[self.scores_key], model_output[self.clean_key])
        return reduce_kl(kl, self.reduction)


@registry.register_loss("villa_adversarial")
class VillaAdversarialLoss(nn.Module):
    """``task + kl_weight · symmetric_kl``: VILLA's per-step objective as one YAML loss.

    ``task`` is a loss name or ``{type: <loss>, params: {...}}`` from the registry. The KL term is
    added only when the output carries the clean logits (``clean_key``); otherwise the task loss is
    returned alone, so the same loss serves clean evaluation.
    """

    def __init__(
        self,
        task: Union[str, Mapping[str, Any]] = "logit_bce",
        kl_weight: float = 1.5,
        reduction: str = "mean_times_classes",
        clean_key: str = "clean_scores",
        scores_key: str = "scores",
    ):
        super().__init__()
        self.task_loss = _build_loss(task)
        self.kl_loss = SymmetricKLLoss(reduction, clean_key=clean_key, scores_key=scores_key)
        self.kl_weight = float(kl_weight)

    def forward(self, sample_list: Any, model_output: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = self.task_loss(sample_list, model_output)
        if self.kl_loss.clean_key in model_output:
            loss = loss + self.kl_weight * self.kl_loss(sample_list, model_output)
        return loss


def _build_loss(spec: Union[str, Mapping[str, Any], None]) -> nn.Module:
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping) and "type" in spec:
        name, params = spec["type"], dict(spec.get("params") or {})
    else:
        raise ConfigError(
            f"villa_adversarial.params.task must be a loss name or {{type: <loss>, params: {{...}}}}, got {spec!r}."
        )
    return registry.get_loss_class(name)(**params)
