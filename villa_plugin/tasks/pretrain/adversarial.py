"""VILLA stage 1 (adversarial pre-training): the per-task choices the official sources leave open.

The official code never released stage 1 (uniter-pretraining.md §12). What is fixed by the
sources: δ in the embedding space of each modality, free AT, a KL-based consistency term, the
fine-tuning recipe to transfer (K 3, zero init, l2 steps, no projection, α 1.5, lr 1e-3, text).
Everything below that goes beyond that is **our choice**, documented in ``docs/pretraining.md``:

- which tasks get δ: ``adv_tasks`` (default ``[mlm, mrckl, itm]``; MRFR trains clean);
- the consistency term per task: ``symmetric_kl`` only where the output is a distribution (MLM over
  the masked tokens, MRC / MRC-kl over the masked regions, ITM over the pair), reduced by
  ``sum_classes_mean`` (sum over classes, mean over rows, like the CE beside it); for MRFR either
  ``none`` (default) or ``mse`` (per-element MSE between clean and perturbed predicted features,
  normalised like the MRFR loss); a softmax KL on regressed features is rejected;
- the modality per task (default: the engine's ``adv_modality``);
- whether WRA's OT term is recomputed on the perturbed passes (``itm_ot_in_adv_steps``, default
  true: the step loss is the task's full loss ``xe + 0.1·ot``).

The engine hyper-parameters (K, step sizes, α, norm, formulation) are the fine-tuning
:class:`~villa_plugin.adversarial.config.AdversarialConfig`; adversarial pre-training is off unless
``adv_training`` is true.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from villa_plugin.adversarial.config import AdversarialConfig
from villa_plugin.adversarial.losses import KL_REDUCTIONS, reduce_kl, symmetric_kl
from villa_plugin.common.errors import ConfigError
from villa_plugin.tasks.pretrain.model import TASKS

CONSISTENCY_TERMS = ("symmetric_kl", "mse", "none")
DISTRIBUTION_TASKS = ("mlm", "mrc", "mrckl", "itm")  # outputs are logits over classes
DEFAULT_ADV_TASKS = ("mlm", "mrckl", "itm")
DEFAULT_KL_REDUCTION = "sum_classes_mean"
OWN_KEYS = ("adv_tasks", "consistency", "kl_reduction", "modality", "itm_ot_in_adv_steps")


@dataclasses.dataclass(frozen=True)
class TaskAdversarialSetting:
    """What one pre-training task does under VILLA."""

    perturb: bool
    modality: Tuple[str, ...]
    consistency: str  # symmetric_kl | mse | none
    kl_reduction: Optional[str]  # a name of adversarial.losses.KL_REDUCTIONS when consistency is symmetric_kl


@dataclasses.dataclass(frozen=True)
class PretrainAdversarialConfig:
    """Engine hyper-parameters plus one :class:`TaskAdversarialSetting` per pre-training task."""

    engine: AdversarialConfig
    tasks: Mapping[str, TaskAdversarialSetting]
    itm_ot_in_adv_steps: bool = True

    def setting(self, task: str) -> TaskAdversarialSetting:
        """The setting of ``task`` (``mrckl`` style names); unknown tasks are a ConfigError."""
        if task not in self.tasks:
            raise ConfigError(f"No adversarial setting for pre-training task {task!r}; tasks: {sorted(self.tasks)}.")
        return self.tasks[task]

    def perturbs(self, task: str) -> bool:
        return self.engine.adv_training and self.setting(task).perturb

    @classmethod
    def from_dict(cls, block: Optional[Mapping[str, Any]], key_prefix: str = "adversarial") -> "PretrainAdversarialConfig":
        """Read the model's ``adversarial`` block: the fine-tuning keys plus ``adv_tasks``,
        ``consistency`` / ``kl_reduction`` / ``modality`` (``{task: value}``) and ``itm_ot_in_adv_steps``."""
        block = dict(block or {})
        own = {key: block.pop(key) for key in OWN_KEYS if key in block}
        try:
            engine = AdversarialConfig.from_dict(block, key_prefix=key_prefix)
        except ConfigError as err:
            raise ConfigError(f"{err} Pre-training also accepts: {', '.join(OWN_KEYS)}.") from err
        if "adv_training" not in block:
            engine = dataclasses.replace(engine, adv_training=False)
        adv_tasks = own.get("adv_tasks", DEFAULT_ADV_TASKS)
        if isinstance(adv_tasks, str) or not all(isinstance(t, str) for t in adv_tasks):
            raise ConfigError(f"{key_prefix}.adv_tasks must be a list of task names, got {adv_tasks!r}.")
        overrides = {name: _task_map(own.get(name), f"{key_prefix}.{name}") for name in ("consistency", "kl_reduction", "modality")}
        for task in list(adv_tasks) + [t for m in overrides.values() for t in m]:
            _check_task(task, key_prefix)
        tasks = {task: _setting(task, task in adv_tasks, engine, overrides, key_prefix) for task in TASKS}
        ot_steps = own.get("itm_ot_in_adv_steps", True)
        if not isinstance(ot_steps, bool):
            raise ConfigError(f"{key_prefix}.itm_ot_in_adv_steps must be true or false, got {ot_steps!r}.")
        return cls(engine=engine, tasks=tasks, itm_ot_in_adv_steps=ot_steps)


def _task_map(value: Any, key: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must map task names to values, e.g. {{mrfr: mse}}; got {value!r}.")
    return dict(value)


def _check_task(task: str, key_prefix: str) -> None:
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        raise ConfigError(f"{key_prefix}: unknown pre-training task {task!r}.{hint} Tasks: {', '.join(TASKS)}.")


def _setting(task: str, perturb: bool, engine: AdversarialConfig, overrides: Mapping[str, Mapping[str, Any]],
             key_prefix: str) -> TaskAdversarialSetting:
    default = "symmetric_kl" if task in DISTRIBUTION_TASKS else "none"
    for name in ("consistency", "kl_reduction", "modality"):
        if task in overrides[name] and not perturb:
            raise ConfigError(f"{key_prefix}.{name}.{task} is set but {task} is not in adv_tasks, so it would have "
                              f"no effect. Add {task} to adv_tasks or remove the entry.")
    consistency = overrides["consistency"].get(task, default)
    if consistency not in CONSISTENCY_TERMS:
        raise ConfigError(f"{key_prefix}.consistency.{task} = {consistency!r}; use one of {', '.join(CONSISTENCY_TERMS)}.")
    if consistency == "symmetric_kl" and task not in DISTRIBUTION_TASKS:
        raise ConfigError(f"{key_prefix}.consistency.{task} = symmetric_kl: {task} regresses features, its output is not "
                          f"a distribution. Use none or mse.")
    if consistency == "mse" and task in DISTRIBUTION_TASKS:
        raise ConfigError(f"{key_prefix}.consistency.{task} = mse: {task} outputs class logits; use symmetric_kl or none.")
    reduction = overrides["kl_reduction"].get(task)
    if reduction is not None and consistency != "symmetric_kl":
        raise ConfigError(f"{key_prefix}.kl_reduction.{task} is set but {task}'s consistency is {consistency!r}, so it "
                          f"would have no effect. Remove it or set consistency.{task}: symmetric_kl.")
    if consistency == "symmetric_kl":
        reduction = reduction or DEFAULT_KL_REDUCTION
        if reduction not in KL_REDUCTIONS:
            raise ConfigError(f"{key_prefix}.kl_reduction.{task} = {reduction!r}; use one of {', '.join(KL_REDUCTIONS)}.")
    modality = overrides["modality"].get(task)
    if modality is not None:
        modality = AdversarialConfig(adv_modality=modality, key_prefix=f"{key_prefix}.modality.{task}").adv_modality
    return TaskAdversarialSetting(perturb=perturb, modality=modality or engine.adv_modality,
                                  consistency=consistency, kl_reduction=reduction)


def consistency_loss(setting: TaskAdversarialSetting, adv_scores: torch.Tensor,
                     clean_scores: torch.Tensor) -> Optional[torch.Tensor]:
    """The consistency term between perturbed and clean ``scores`` of one task (None for ``none``).

    ``symmetric_kl``: VILLA's symmetric KL over softmax outputs, reduced by the setting's reduction;
    ``mse``: per-element mean squared difference of the predicted features (MRFR). Gradients flow
    into both arguments, as in VILLA's fine-tuning.
    """
    if setting.consistency == "none":
        return None
    if adv_scores.shape != clean_scores.shape:
        raise ValueError(f"consistency_loss: perturbed scores {tuple(adv_scores.shape)} and clean scores "
                         f"{tuple(clean_scores.shape)} differ; both passes must see the same masked batch.")
    if setting.consistency == "mse":
        return F.mse_loss(adv_scores.float(), clean_scores.float())
    return reduce_kl(symmetric_kl(adv_scores, clean_scores), setting.kl_reduction)


__all__ = ["PretrainAdversarialConfig", "TaskAdversarialSetting", "consistency_loss", "CONSISTENCY_TERMS"]
