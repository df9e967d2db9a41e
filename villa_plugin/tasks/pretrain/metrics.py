"""Validation metrics of the pre-training tasks, with the official definitions (uniter-pretraining.md §9).

Validation accumulates **sums** (additive across batches and ranks) and divides once at the end:

| task  | results                                                                                  |
|-------|------------------------------------------------------------------------------------------|
| mlm   | ``mlm_loss`` = Σ CE / n_masked_tokens; ``mlm_accuracy`` = argmax-correct / n_masked_tokens |
| mrfr  | ``mrfr_loss`` = Σ squared error / 2048 / n_masked_regions (per-element MSE, like training) |
| mrckl | ``mrckl_kl`` = Σ KL / n_masked_regions (the **per-region** KL: 1601× the training value);  |
|       | ``mrckl_accuracy``: argmax of the prediction == argmax of the soft label over all 1601 classes |
| mrc   | ``mrc_loss`` = Σ CE / n; ``mrc_accuracy``: argmax == ``argmax(soft[:, 1:]) + 1`` (the official |
|       | code crashes here; this is its evident intent)                                           |
| itm   | ``itm_loss`` = Σ CE / n_ex; ``itm_accuracy``; with WRA ``itm_ot_loss`` = (Σpos − Σneg) / n_ex, |
|       | ``itm_ot_pos`` = Σpos / n_ex, ``itm_ot_neg`` = Σneg / n_ex (both over **all** examples)      |

Feed :meth:`PretrainValidation.update` the output of ``UniterForPretraining(batch, compute_loss=False)``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F

from villa_plugin.metrics import BaseMetric
from villa_plugin.registry import registry
from villa_plugin.tasks.pretrain.losses import mrc_hard_targets, mrckl_elementwise
from villa_plugin.tasks.pretrain.model import is_kl_task, task_family


class PretrainValidation:
    """Sums per task; :meth:`sums` can be all-reduced across ranks before :meth:`results`."""

    def __init__(self) -> None:
        self._sums: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))

    @torch.no_grad()
    def update(self, task: str, output: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        scores = output["scores"].float()
        sums = self._sums[task]
        family = task_family(task)
        if family == "mlm":
            labels = batch["txt_labels"][batch["txt_labels"] != -1]
            sums["loss"] += F.cross_entropy(scores, labels, reduction="sum").item()
            sums["correct"] += (scores.argmax(-1) == labels).sum().item()
            sums["count"] += labels.numel()
        elif family == "mrfr":
            sums["loss"] += F.mse_loss(scores, batch["feat_targets"].float(), reduction="sum").item() / scores.size(-1)
            sums["count"] += int(batch["img_mask_tgt"].sum())
        elif family == "mrc":
            soft = batch["label_targets"].float()
            if is_kl_task(task):
                sums["loss"] += mrckl_elementwise(scores, soft).sum().item()
                sums["correct"] += (scores.argmax(-1) == soft.argmax(-1)).sum().item()
            else:
                targets = mrc_hard_targets(soft)
                sums["loss"] += F.cross_entropy(scores, targets, reduction="sum").item()
                sums["correct"] += (scores.argmax(-1) == targets).sum().item()
            sums["count"] += int(batch["img_mask_tgt"].sum())
        else:
            targets = batch["targets"]
            sums["loss"] += F.cross_entropy(scores, targets, reduction="sum").item()
            sums["correct"] += (scores.argmax(-1) == targets).sum().item()
            sums["count"] += targets.numel()
            if output.get("ot_distance") is not None:
                distance = output["ot_distance"].float()
                sums["ot_pos"] += distance[targets == 1].sum().item()
                sums["ot_neg"] += distance[targets == 0].sum().item()

    def sums(self) -> Dict[str, Dict[str, float]]:
        """The raw sums ``{task: {name: value}}`` (additive: reduce them across ranks by summing)."""
        return {task: dict(values) for task, values in self._sums.items()}

    def load_sums(self, sums: Mapping[str, Mapping[str, float]]) -> None:
        """Replace the sums, e.g. by their all-reduced values."""
        self._sums = defaultdict(lambda: defaultdict(float))
        for task, values in sums.items():
            self._sums[task].update(values)

    def results(self) -> Dict[str, float]:
        """``{<task>_<metric>: value}`` with the official definitions (see the module docstring)."""
        out: Dict[str, float] = {}
        for task, sums in self._sums.items():
            count = sums["count"]
            if count == 0:
                continue
            name = "kl" if is_kl_task(task) else "loss"
            out[f"{task}_{name}"] = sums["loss"] / count
            if task_family(task) != "mrfr":
                out[f"{task}_accuracy"] = sums["correct"] / count
            if "ot_pos" in sums or "ot_neg" in sums:
                out[f"{task}_ot_loss"] = (sums["ot_pos"] - sums["ot_neg"]) / count
                out[f"{task}_ot_pos"] = sums["ot_pos"] / count
                out[f"{task}_ot_neg"] = sums["ot_neg"] / count
        return out




# -- registered metrics (evaluation.metrics), one per (task, result) ----------------------------------

METRIC_NAMES = {
    "mlm": ("mlm_loss", "mlm_accuracy"),
    "mrfr": ("mrfr_loss",),
    "mrc": ("mrc_loss", "mrc_accuracy"),
    "mrckl": ("mrckl_kl", "mrckl_accuracy"),
    "itm": ("itm_loss", "itm_accuracy", "itm_ot_loss", "itm_ot_pos", "itm_ot_neg"),
}
SUM_NAMES = ("loss", "correct", "count", "ot_pos", "ot_neg")


class PretrainMetric(BaseMetric):
    """One result of :class:`PretrainValidation` for one task (``task``, ``result``), reducible across
    ranks; batches of other tasks are ignored (the trainer evaluates each task view with its metrics)."""

    task: str = ""
    result: str = ""
    state_names = SUM_NAMES

    def update(self, batch, output: Dict[str, Any]) -> None:
        if (output.get("task") or batch.get("task")) != self.task:
            return
        validation = PretrainValidation()
        validation.update(self.task, output, batch)
        for name, value in validation.sums().get(self.task, {}).items():
            self._add(name, torch.tensor(float(value)))

    def compute(self) -> float:
        validation = PretrainValidation()
        validation.load_sums({self.task: {name: float(getattr(self, name)) for name in SUM_NAMES
                                          if name in ("loss", "correct", "count") or float(getattr(self, name)) != 0}})
        results = validation.results()
        if self.result not in results:
            return float("nan") if float(self.count) == 0 else 0.0
        return float(results[self.result])


def _register_metrics() -> Dict[str, type]:
    classes = {}
    for task, names in METRIC_NAMES.items():
        for name in names:
            cls = type(f"Pretrain_{name}", (PretrainMetric,), {"task": task, "result": name, "__module__": __name__})
            classes[name] = registry.register_metric(name)(cls)
    return classes


METRICS = _register_metrics()


class MajorityBaseline(BaseMetric):
    """The chance level of a task's accuracy: the share of its most frequent target on the evaluated
    items (MLM: the masked tokens; ITM: the pairs), i.e. what always predicting one class scores.
    Logged beside the accuracy (``mlm_chance``, ``itm_chance``)."""

    task: str = ""

    def reset(self) -> None:
        self.counts = None

    def update(self, batch, output: Dict[str, Any]) -> None:
        if (output.get("task") or batch.get("task")) != self.task:
            return
        targets = batch["txt_labels"][batch["txt_labels"] != -1] if self.task == "mlm" else batch["targets"]
        counts = torch.bincount(targets.detach().reshape(-1).cpu(), minlength=output["scores"].size(-1)).to(torch.float64)
        self.counts = counts if self.counts is None else self.counts + counts

    def reduce(self, all_reduce_sum, device=None) -> None:
        if self.counts is None:
            raise RuntimeError(f"{self.task}_chance: this rank evaluated no {self.task} batch")
        packed = self.counts.to(device) if device is not None else self.counts
        self.counts = all_reduce_sum(packed).detach().cpu()

    def compute(self) -> float:
        if self.counts is None or float(self.counts.sum()) == 0:
            return float("nan")
        return float(self.counts.max() / self.counts.sum())


CHANCE_METRICS = {task: registry.register_metric(f"{task}_chance")(
    type(f"Pretrain_{task}_chance", (MajorityBaseline,), {"task": task, "__module__": __name__})) for task in ("mlm", "itm")}

__all__ = ["PretrainValidation", "PretrainMetric", "MajorityBaseline", "METRICS", "CHANCE_METRICS", "METRIC_NAMES"]
