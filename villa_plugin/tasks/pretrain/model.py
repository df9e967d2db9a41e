"""``UniterForPretraining``: the UNITER trunk plus the four pre-training heads (uniter-pretraining.md §2, §4-§7).

One forward runs one task, named by ``task`` (or the batch's ``task`` field): ``mlm``, ``mrfr``,
``mrc``, ``mrckl`` (any name starting with ``mrc`` and containing ``kl``) or ``itm``. The output is
``{"task", "scores", "losses"}``: ``scores`` are the per-item outputs the adversarial KL compares
(MLM ``[n_masked_tokens, V]``, MRFR ``[n_masked_regions, 2048]``, MRC ``[n_masked_regions, 1601]``,
ITM ``[B, 2]``); ``losses`` holds the official normalised losses (their sum is the update's loss).
ITM with WRA also returns ``ot_distance`` ``[B]`` and ``losses["itm_ot"] = λ·ot_loss``.

The state-dict keys are the official ones (``uniter.*``, ``cls.*``, ``feat_regress.*``,
``region_classifier.*``, ``itm_output.*``), so ``uniter-*.pt`` / ``villa-*.pt`` load unchanged and
our checkpoints load as ``pretrained_checkpoint`` of every fine-tuning model.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from villa_plugin.common.errors import DataError
from villa_plugin.backbones.uniter.model import IMG_DIM, UniterConfig, UniterModel, init_uniter_weights
from villa_plugin.tasks.pretrain import losses as L
from villa_plugin.tasks.pretrain.heads import IMG_LABEL_DIM, MLMHead, RegionClassification, RegionFeatureRegression
from villa_plugin.tasks.pretrain.ot import wra_distance

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
ITM_OT_LAMBDA = 0.1  # itm_ot_lambda of every released pre-training config
# Batch keys (names of the official collates) each task reads to run, and to compute its loss.
INPUT_KEYS = {"mlm": ("txt_labels",), "mrfr": ("img_masks", "img_mask_tgt"), "mrc": ("img_masks", "img_mask_tgt"),
              "itm": ()}
TARGET_KEYS = {"mlm": (), "mrfr": ("feat_targets",), "mrc": ("label_targets",), "itm": ("targets",)}
TRUNK_KEYS = ("input_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index")


def task_family(task: str) -> str:
    """``mlm`` | ``mrfr`` | ``mrc`` (hard and kl) | ``itm``, by the official dispatch (``startswith('mrc')``)."""
    if task in ("mlm", "mrfr", "itm"):
        return task
    if task.startswith("mrc"):
        return "mrc"
    raise DataError(f"Unknown pre-training task {task!r}; use one of {', '.join(TASKS)}.")


def is_kl_task(task: str) -> bool:
    """MRC with soft labels: any ``mrc*`` name containing ``kl`` (the configs use ``mrckl``)."""
    return task.startswith("mrc") and "kl" in task


def _require(batch: Mapping[str, Any], task: str, keys) -> None:
    missing = [k for k in keys if batch.get(k) is None]
    if missing:
        hint = ""
        if "label_targets" in missing:
            hint = (" label_targets are the soft_labels [n, 1601] rows of the masked regions: the img_db "
                    "must hold 'soft_labels' and the batch must come from the mrc collate.")
        raise DataError(f"Pre-training task {task!r} needs batch key(s) {missing}, which the batch lacks "
                        f"(it has: {sorted(batch)}).{hint}")


def masked_rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ``[n, H]`` rows of ``hidden`` ``[B, L, H]`` where ``mask`` ``[B, L]`` is true, row-major."""
    return hidden[mask.bool()]


class UniterForPretraining(nn.Module):
    """UNITER + ``cls`` (MLM, tied), ``feat_regress`` (MRFR, tied), ``region_classifier`` (MRC), ``itm_output``."""

    def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM, img_label_dim: int = IMG_LABEL_DIM,
                 itm_ot_lambda: float = ITM_OT_LAMBDA):
        super().__init__()
        self.config = config
        self.uniter = UniterModel(config, img_dim)
        self.cls = MLMHead(self.uniter.embeddings.word_embeddings.weight)
        self.feat_regress = RegionFeatureRegression(config.hidden_size, self.uniter.img_embeddings.img_linear.weight)
        self.region_classifier = RegionClassification(config.hidden_size, img_label_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.itm_ot_lambda = float(itm_ot_lambda)
        # As the reference, init_weights runs over the whole model (the raw bias Parameters stay 0).
        self.apply(lambda module: init_uniter_weights(module, config.initializer_range))

    # VILLA: every pre-training output compared by the KL is a distribution over its last dim
    # (MLM, MRC, ITM): sum over classes, mean over rows. MRFR is handled by adversarial.py.
    kl_reduction = "sum_classes_mean"

    def forward(self, batch: Mapping[str, Any], perturbation: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
                task: Optional[str] = None, compute_loss: bool = True) -> Dict[str, Any]:
        """Run ``task`` on ``batch`` (see the module docstring); ``perturbation`` = ``{"text", "image"}`` δ."""
        task = task or batch.get("task")
        if not task:
            raise DataError("UniterForPretraining needs the task: pass task= or a batch field 'task' "
                            f"(one of {', '.join(TASKS)}).")
        family = task_family(task)
        _require(batch, task, TRUNK_KEYS + INPUT_KEYS[family] + (TARGET_KEYS[family] if compute_loss else ()))
        img_masks = batch["img_masks"] if family in ("mrfr", "mrc") else None
        perturbation = perturbation or {}
        sequence = self.uniter(
            batch["input_ids"], batch.get("position_ids"), batch["img_feat"], batch["img_pos_feat"],
            batch["attn_masks"], batch["gather_index"], img_masks=img_masks, output_all_encoded_layers=False,
            txt_delta=perturbation.get("text"), img_delta=perturbation.get("image"),
        )
        output: Dict[str, Any] = {"task": task}
        if family == "mlm":
            labels = batch["txt_labels"]
            text = sequence[:, : batch["input_ids"].size(1)]  # every row's text starts at 0
            output["scores"] = self.cls(masked_rows(text, labels != -1))
            if compute_loss:
                output["losses"] = {task: L.mlm_loss(output["scores"], labels[labels != -1])}
        elif family == "mrfr":
            output["scores"] = self.feat_regress(masked_rows(sequence, batch["img_mask_tgt"]))
            if compute_loss:
                output["losses"] = {task: L.mrfr_loss(output["scores"], batch["feat_targets"])}
        elif family == "mrc":
            output["scores"] = self.region_classifier(masked_rows(sequence, batch["img_mask_tgt"]))
            if compute_loss:
                loss = L.mrckl_loss if is_kl_task(task) else L.mrc_loss
                output["losses"] = {task: loss(output["scores"], batch["label_targets"])}
        else:
            output["scores"] = self.itm_output(self.uniter.pooler(sequence))
            if compute_loss:
                output["losses"] = {task: L.itm_loss(output["scores"], batch["targets"])}
            self._add_wra(output, sequence, batch, task, compute_loss)
        return output

    def _add_wra(self, output: Dict[str, Any], sequence: torch.Tensor, batch: Mapping[str, Any], task: str,
                 compute_loss: bool) -> None:
        ot_inputs = batch.get("ot_inputs")
        if ot_inputs is None:
            if self.itm_ot_lambda > 0 and compute_loss:
                raise DataError(
                    f"itm_ot_lambda = {self.itm_ot_lambda} (WRA on) but the ITM batch has no 'ot_inputs': collate "
                    f"it with itm_collate(..., with_ot=True), or set itm_ot_lambda to 0 to train ITM without WRA."
                )
            return
        distance = wra_distance(sequence, batch["input_ids"].size(1), batch["img_feat"].size(1), ot_inputs)
        output["ot_distance"] = distance
        if compute_loss and self.itm_ot_lambda > 0:
            output["losses"][f"{task}_ot"] = self.itm_ot_lambda * L.wra_loss(distance, batch["targets"])

    # -- VILLA (Perturbable) ------------------------------------------------------------------
    def perturbation_shapes(self, batch: Mapping[str, Any]) -> Dict[str, tuple]:
        """``{"text": (B, Lt, H), "image": (B, Nb, 2048)}``: δ covers padding and masked positions too."""
        input_ids, img_feat = batch["input_ids"], batch["img_feat"]
        return {
            "text": (int(input_ids.size(0)), int(input_ids.size(1)), self.config.hidden_size),
            "image": tuple(int(s) for s in img_feat.shape),
        }

    def perturbation_masks(self, batch: Mapping[str, Any]) -> Dict[str, Optional[torch.Tensor]]:
        """``[B, L]`` bool, True on real tokens / regions (padding False)."""
        txt_lens, num_bbs = batch.get("txt_lens"), batch.get("num_bbs")
        if txt_lens is None or num_bbs is None:
            return {"text": None, "image": None}
        input_ids, img_feat = batch["input_ids"], batch["img_feat"]
        txt = torch.arange(input_ids.size(1), device=input_ids.device)[None] < torch.as_tensor(txt_lens, device=input_ids.device)[:, None]
        img = torch.arange(img_feat.size(1), device=img_feat.device)[None] < torch.as_tensor(num_bbs, device=img_feat.device)[:, None]
        return {"text": txt, "image": img}


__all__ = ["TASKS", "ITM_OT_LAMBDA", "UniterForPretraining", "task_family", "is_kl_task", "masked_rows"]
