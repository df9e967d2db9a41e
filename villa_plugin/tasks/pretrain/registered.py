"""Registered model ``uniter_pretrain``: :class:`UniterForPretraining` behind MMF's model contract, with
VILLA's per-task adversarial settings (``configs/models/uniter_pretrain/defaults.yaml``).

The batch names its task (``batch["task"]``, set by the task view's collate). ``forward`` returns
``{"task", "scores", "losses", ["ot_distance"]}`` with the losses keyed
``<split>/<dataset>/<task>`` (and ``.../itm_ot`` for WRA). The state-dict keys are the official
ones (the children of the pre-training model are this model's children), so official checkpoints
load and our checkpoints fine-tune unchanged.

For ``villa_free_at`` it is :class:`~villa_plugin.adversarial.protocol.Perturbable`, and it tells the
trainer what each task does (:meth:`adversarial_config` reads the block,
:meth:`task_adversarial` gives one task's engine config and consistency term).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from villa_plugin.adversarial.config import AdversarialConfig
from villa_plugin.backbones.uniter.checkpoint_keys import LoadReport
from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.config.paths import bundled_path
from villa_plugin.models.base_model import BaseModel
from villa_plugin.models.registered import _plain, trunk_config
from villa_plugin.registry import registry
from villa_plugin.tasks.pretrain.adversarial import PretrainAdversarialConfig, consistency_loss
from villa_plugin.tasks.pretrain.checkpoint import load_pretraining_checkpoint
from villa_plugin.tasks.pretrain.heads import IMG_LABEL_DIM
from villa_plugin.tasks.pretrain.model import ITM_OT_LAMBDA, UniterForPretraining, task_family


@registry.register_model("uniter_pretrain")
class UniterPretrain(BaseModel):
    """UNITER pre-training (MLM, MRFR, MRC, MRC-kl, ITM + WRA) with VILLA's adversarial block."""

    model_name = "uniter_pretrain"
    kl_reduction = "sum_classes_mean"  # every distribution output: sum over classes, mean over rows

    @classmethod
    def config_path(cls) -> str:
        return bundled_path(f"configs/models/{cls.model_name}/defaults.yaml")

    @classmethod
    def adversarial_config(cls, config: Any) -> PretrainAdversarialConfig:
        """``model_config.<model>.adversarial`` of a full config, with the per-task keys."""
        name = config.get("model") if hasattr(config, "get") else None
        block = _plain((config.get("model_config") or {}).get(name) or {}).get("adversarial") if name else None
        return PretrainAdversarialConfig.from_dict(block, key_prefix=f"model_config.{name}.adversarial")

    def build(self) -> None:
        cfg = _plain(self.config)
        self.uniter_config = trunk_config(cfg, f"model_config.{self.model_name}")
        self.adversarial = PretrainAdversarialConfig.from_dict(cfg.get("adversarial"),
                                                               key_prefix=f"model_config.{self.model_name}.adversarial")
        core = UniterForPretraining(self.uniter_config, img_label_dim=int(cfg.get("img_label_dim", IMG_LABEL_DIM)),
                                    itm_ot_lambda=float(cfg.get("itm_ot_lambda", ITM_OT_LAMBDA)))
        for child_name, child in core.named_children():  # official top-level key names
            self.add_module(child_name, child)
        object.__setattr__(self, "_core", core)  # runs the forward on the same modules; not a submodule
        self.load_report: Optional[LoadReport] = None
        checkpoint = cfg.get("pretrained_checkpoint") or ""
        if checkpoint:
            path = os.path.expanduser(str(checkpoint))
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"model_config.{self.model_name}.pretrained_checkpoint = {checkpoint}: file not found (resolved to "
                    f"{os.path.abspath(path)}). Fix the path, or set it to \"\" to start from random weights.")
            self.load_report = load_pretraining_checkpoint(self, path)
        # The trunk zero-fills mask_embedding row 0 in place before every masked-region forward (§5),
        # so its value is never used; zeroing it up front makes that fill a no-op, which keeps sharded
        # storages (fsdp2 writes the fill only into a temporary unsharded copy) equal to one process.
        with torch.no_grad():
            self.uniter.img_embeddings.mask_embedding.weight[0].fill_(0)

    @property
    def core(self) -> UniterForPretraining:
        return self.__dict__["_core"]

    def forward(self, sample_list, perturbation: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        task = sample_list.get("task")
        compute_loss = _has_targets(sample_list, task)
        output = self.core(sample_list, perturbation=perturbation, compute_loss=compute_loss)
        if perturbation is not None and not self.adversarial.itm_ot_in_adv_steps:
            output.get("losses", {}).pop(f"{task}_ot", None)  # itm_ot_in_adv_steps: false
        if "losses" in output:
            prefix = f"{sample_list.get('dataset_type', 'train')}/{sample_list.get('dataset_name', 'pretrain')}"
            output["losses"] = {f"{prefix}/{key}": value for key, value in output["losses"].items()}
        return output

    # -- VILLA (Perturbable + per-task settings) -----------------------------------------------
    def perturbation_shapes(self, sample_list) -> Dict[str, tuple]:
        return self.core.perturbation_shapes(sample_list)

    def perturbation_masks(self, sample_list) -> Dict[str, Optional[torch.Tensor]]:
        return self.core.perturbation_masks(sample_list)

    def task_adversarial(self, task: str, engine: AdversarialConfig) -> Tuple[AdversarialConfig, Callable]:
        """``(engine config, consistency(adv_scores, clean_scores))`` of ``task``: δ only for ``adv_tasks``
        (``adv_training`` false otherwise), the task's modalities, its consistency term (a zero term
        for ``none``, kept in the graph so the ``exact`` formulation's bookkeeping holds)."""
        setting = self.adversarial.setting(task)
        config = dataclasses.replace(engine, adv_training=engine.adv_training and setting.perturb,
                                     adv_modality=setting.modality)

        def consistency(adv_scores: torch.Tensor, clean_scores: torch.Tensor) -> torch.Tensor:
            term = consistency_loss(setting, adv_scores, clean_scores)
            if term is None:
                return (adv_scores.float().sum() + clean_scores.float().sum()) * 0.0
            return term

        return config, consistency


def _has_targets(batch: Mapping[str, Any], task: Optional[str]) -> bool:
    if not task:
        return False
    family = task_family(task)
    key = {"mlm": "txt_labels", "mrfr": "feat_targets", "mrc": "label_targets", "itm": "targets"}[family]
    return batch.get(key) is not None


__all__ = ["UniterPretrain"]
