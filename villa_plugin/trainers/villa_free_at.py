"""The ``villa_free_at`` trainer: the ``mmf`` loop with VILLA's free adversarial training step.

Only :meth:`run_training_batch` changes: the micro-batch goes through
:class:`villa_plugin.adversarial.FreeATEngine` (clean forward + K ascent steps; parameter
gradients accumulate over the steps). The settings are read from
``model_config.<model>.adversarial``; with ``adv_training: false`` the step is exactly the plain
trainer's, so ``model=uniter`` on a VILLA experiment is the baseline.

Logged per update (means over micro-batches): ``train/total_loss`` (task + α·KL averaged over the
perturbed forwards), ``train/adv/task_loss``, ``train/adv/kl``, ``train/adv/clean_task_loss``,
``train/adv/delta_norm_<modality>``, ``train/adv/delta_ratio_<modality>`` (δ's norm over its input's,
when the model reports it) and ``train/adv/ascent_skips``. The ``adversary_check`` callback warns once
when the KL shows the adversary barely changes the predictions (trainers/adversary_check.py).
"""
from __future__ import annotations

from typing import Dict

import torch

from villa_plugin.adversarial import AdversarialConfig, FreeATEngine
from villa_plugin.adversarial.protocol import check_perturbable
from villa_plugin.common.sample_list import SampleList
from villa_plugin.registry import registry
from villa_plugin.trainers.adversary_check import AdversaryCheckCallback
from villa_plugin.trainers.base_trainer import MMFTrainer


@registry.register_trainer("villa_free_at")
class VillaFreeATTrainer(MMFTrainer):
    """``MMFTrainer`` whose training step is VILLA's free adversarial training."""

    runs_adversarial_loop = True

    def setup(self, plan) -> None:
        # Validate the adversarial block before the (slow) model and data set-up. A model whose
        # batches name their task (pre-training) reads its own block: per-task settings on top.
        reader = getattr(registry.get_model_class(self.config.model), "adversarial_config", None) if self.config.get("model") else None
        self.adv_config = reader(self.config).engine if reader else AdversarialConfig.from_model_config(self.config)
        super().setup(plan)
        self.engine = FreeATEngine(self.adv_config)
        self.task_engines: Dict[str, tuple] = {}
        self.kl_reduction = self._check_model_supports_perturbations()
        if self.adv_config.adv_training:
            self.log.info(f"villa_free_at: {self.adv_config}")
            self.callbacks.callbacks.append(AdversaryCheckCallback(self))  # last: the user's indices stay

    def _check_model_supports_perturbations(self) -> str:
        if not self.adv_config.adv_training:
            return ""
        return check_perturbable(self.raw_model, self.config.get("model"))

    def run_training_batch(self, batch: SampleList, is_last_micro_batch: bool) -> Dict[str, torch.Tensor]:
        """Clean forward + K ascent steps of VILLA on one micro-batch (plain step when disabled)."""
        engine, consistency = self._engine_for(batch)
        if not engine.config.adv_training:
            return super().run_training_batch(batch, is_last_micro_batch)
        stats = engine.step(
            self.model,
            batch,
            backward=self.backward,
            sync_context=lambda is_last: self.strategy.sync_context(self.model, is_last),
            is_last_micro_batch=is_last_micro_batch,
            kl_reduction=self.kl_reduction,
            forward_context=self.autocast,
            unwrap=self.strategy.unwrap,
            consistency=consistency,
        )
        out = {"train/total_loss": stats.pop("loss")}
        task = batch.get("task") if consistency is not None else None
        prefix = f"train/adv/{task}/" if task else "train/adv/"
        out.update({f"{prefix}{key}": value.detach().float() for key, value in stats.items()})
        return out

    def _engine_for(self, batch: SampleList):
        """``(engine, consistency)``: the model's per-task settings when it has them (``task_adversarial``,
        pre-training: δ only for adv_tasks, per-task modality and consistency), else the one engine."""
        task_adversarial = getattr(self.raw_model, "task_adversarial", None)
        task = batch.get("task") if task_adversarial is not None else None
        if not task:
            return self.engine, None
        if task not in self.task_engines:
            config, consistency = task_adversarial(task, self.adv_config)
            self.task_engines[task] = (FreeATEngine(config), consistency)
            self.log.info(f"villa_free_at: task {task}: adv_training={config.adv_training}, modality={list(config.adv_modality)}")
        return self.task_engines[task]
