"""Metrics accumulated over a split, with their state in tensors so ranks can sum it.

``evaluation.metrics: [name | {type, key, params, datasets}]``; each value is reported as
``<split>/<dataset>/<key>`` (``key`` defaults to the type).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import registry


class BaseMetric:
    """``reset()`` -> ``update(batch, output)`` per batch -> ``reduce(all_reduce_sum)`` -> ``compute()``.

    Subclasses list their sums in ``state_names``; each is a float64 tensor, so a distributed run
    sums them across ranks with one collective before ``compute``.
    """

    state_names: tuple = ()

    def __init__(self, **params: Any):
        self.params = params
        self.reset()

    def reset(self) -> None:
        for name in self.state_names:
            setattr(self, name, torch.zeros((), dtype=torch.float64))

    def update(self, batch, output: Dict[str, Any]) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None) -> None:
        """Sum every state tensor across ranks (in one collective) in place."""
        if not self.state_names:
            return
        packed = torch.stack([getattr(self, n).to(torch.float64).reshape(()) for n in self.state_names])
        if device is not None:
            packed = packed.to(device)
        packed = all_reduce_sum(packed)
        for i, name in enumerate(self.state_names):
            setattr(self, name, packed[i].detach().cpu())

    def _add(self, name: str, value: torch.Tensor) -> None:
        setattr(self, name, getattr(self, name) + value.detach().to("cpu", torch.float64))


@registry.register_metric("accuracy")
class Accuracy(BaseMetric):
    """Fraction of argmax predictions equal to the target class.

    Targets are class indices ``[B]`` or one-hot / soft rows ``[B, C]`` (compared by argmax). Scores
    of shape ``[B]`` or ``[B, 1]`` are binary logits (positive when > 0).
    """

    state_names = ("correct", "total")

    def update(self, batch, output: Dict[str, Any]) -> None:
        scores = output["scores"].detach()
        targets = batch["targets"].detach().to(scores.device)
        if scores.dim() == 1 or scores.size(-1) == 1:
            predicted = (scores.reshape(-1) > 0).long()
            truth = targets.reshape(-1).round().long()
        else:
            predicted = scores.argmax(dim=-1)
            truth = targets.argmax(dim=-1) if targets.dim() == scores.dim() else targets.long()
        self._add("correct", (predicted == truth).sum())
        self._add("total", torch.tensor(predicted.numel()))

    def compute(self) -> float:
        return float(self.correct / self.total) if self.total > 0 else 0.0


@registry.register_metric("vqa_accuracy")
class VQAAccuracy(BaseMetric):
    """UNITER's soft VQA score: ``Σ onehot(argmax(scores)) · targets / N``.

    Unlike MMF, index 0 is not masked: UNITER's answer 0 is a real answer.
    """

    state_names = ("score", "total")

    def update(self, batch, output: Dict[str, Any]) -> None:
        scores = output["scores"].detach()
        targets = batch["targets"].detach().to(scores.device, torch.float64)
        predicted = scores.argmax(dim=-1, keepdim=True)
        self._add("score", targets.gather(-1, predicted).sum())
        self._add("total", torch.tensor(scores.size(0)))

    def compute(self) -> float:
        return float(self.score / self.total) if self.total > 0 else 0.0


@dataclass
class MetricSpec:
    """One configured metric: report ``key``, the metric type and the datasets it applies to."""

    key: str
    type: str
    params: Dict[str, Any]
    datasets: Optional[List[str]] = None

    def applies_to(self, dataset_name: str) -> bool:
        return self.datasets is None or dataset_name in self.datasets

    def build(self) -> BaseMetric:
        return registry.get_metric_class(self.type)(**self.params)


def parse_metric_specs(specs: Any) -> List[MetricSpec]:
    """``evaluation.metrics`` entries -> :class:`MetricSpec` list (unknown types fail early)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(specs):
        specs = OmegaConf.to_container(specs, resolve=True)
    parsed = []
    for spec in specs or []:
        if isinstance(spec, str):
            parsed.append(MetricSpec(key=spec, type=spec, params={}))
        elif isinstance(spec, dict) and spec.get("type"):
            datasets = spec.get("datasets")
            if isinstance(datasets, str):
                datasets = [datasets]
            parsed.append(
                MetricSpec(
                    key=str(spec.get("key") or spec["type"]),
                    type=str(spec["type"]),
                    params=dict(spec.get("params") or {}),
                    datasets=list(datasets) if datasets else None,
                )
            )
        else:
            raise ConfigError(
                f"evaluation.metrics entries must be a name or {{type, key, params, datasets}}, got {spec!r}"
            )
    for spec in parsed:
        registry.get_metric_class(spec.type)  # RegistryError now rather than after training
    return parsed


# ----------------------------------------------------------------------------------------------
# NLVR2 and VCR (datasets/builders/nlvr2.py, vcr.py provide the batch fields these read)
# ----------------------------------------------------------------------------------------------
def nlvr2_sentence_key(identifier: str) -> str:
    """The sentence an NLVR2 identifier belongs to: the identifier without its third dash field
    (``dev-850-0-1`` -> ``dev-850-1``), as the official scorer groups them for consistency."""
    parts = str(identifier).split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} does not have the form split-set-pair-sentence")
    return "-".join(parts[:2] + parts[3:])


@registry.register_metric("nlvr2_accuracy")
class Nlvr2Accuracy(Accuracy):
    """NLVR2 accuracy: argmax of the ``[examples, 2]`` logits against ``targets`` (1 = True)."""


@registry.register_metric("nlvr2_consistency")
class Nlvr2Consistency(BaseMetric):
    """Fraction of unique sentences whose predictions are all correct (NLVR2's consistency).

    Reads ``sentence_index`` (LongTensor [B]: the example's sentence among the split's
    ``num_sentences`` unique sentences, see :func:`nlvr2_sentence_key`) and ``num_sentences`` from
    the batch. State: per-sentence counts of examples seen and wrong, summed across ranks (every
    rank numbers sentences over the whole split, so the vectors line up).
    """

    def reset(self) -> None:
        self.seen: Optional[torch.Tensor] = None
        self.wrong: Optional[torch.Tensor] = None

    def update(self, batch, output: Dict[str, Any]) -> None:
        if batch.get("targets") is None:
            return
        if batch.get("sentence_index") is None or batch.get("num_sentences") is None:
            raise KeyError("nlvr2_consistency needs the batch fields sentence_index and num_sentences "
                           "(the nlvr2 builder's batches carry them)")
        size = int(batch["num_sentences"])
        if self.seen is None:
            self.seen = torch.zeros(size, dtype=torch.float64)
            self.wrong = torch.zeros(size, dtype=torch.float64)
        index = batch["sentence_index"].detach().to("cpu", torch.long).reshape(-1)
        predicted = output["scores"].detach().argmax(dim=-1).cpu().reshape(-1)
        truth = batch["targets"].detach().cpu().long().reshape(-1)
        self.seen.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        self.wrong.index_add_(0, index, (predicted != truth).to(torch.float64))

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None) -> None:
        if self.seen is None:
            return
        packed = torch.cat([self.seen, self.wrong])
        packed = all_reduce_sum(packed.to(device) if device is not None else packed).detach().cpu()
        self.seen, self.wrong = packed[: self.seen.numel()], packed[self.seen.numel():]

    def compute(self) -> float:
        if self.seen is None or not bool((self.seen > 0).any()):
            return 0.0
        present = self.seen > 0
        return float(((self.wrong == 0) & present).sum() / present.sum())


def vcr_candidate_scores(scores: torch.Tensor, num_questions: int) -> torch.Tensor:
    """Per-question candidate scores ``[n_q, rows_per_question]`` from the head's row logits:
    ``logit[:, 1]`` of ``[rows, 2]`` logits (a single column is taken as it is)."""
    column = scores[:, 1] if scores.dim() == 2 and scores.size(1) == 2 else scores.reshape(scores.size(0), -1)[:, -1]
    if num_questions <= 0 or column.numel() % num_questions:
        raise ValueError(f"{column.numel()} VCR rows do not split evenly over {num_questions} questions")
    return column.reshape(num_questions, -1)


def vcr_rationale_scores(per_question: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """The 4 rationale scores of each question, conditioned on ``answers`` [n_q].

    8 rows per question (4 answers, 4 rationales given the gt answer): columns 4..7. 20 rows (4
    answers, then 4 rationales for each of the 4 answers): columns 4+4a..7+4a, chosen **per
    question** (the official VILLA code used one index for the whole batch).
    """
    rows = per_question.size(1)
    if rows == 8:
        return per_question[:, 4:8]
    if rows == 20:
        offsets = 4 + 4 * answers.to(per_question.device).long().reshape(-1, 1) + torch.arange(4, device=per_question.device)
        return per_question.gather(1, offsets)
    raise ValueError(f"VCR batches have 8 or 20 rows per question, got {rows}")


def vcr_correct(batch, output: Dict[str, Any]):
    """``(qa_correct, qar_correct)`` bool tensors [n_q] of a labelled VCR batch (None if unlabelled)."""
    if batch.get("qa_targets") is None or batch.get("qar_targets") is None:
        return None
    qa_t = batch["qa_targets"].detach().reshape(-1).long()
    qar_t = batch["qar_targets"].detach().reshape(-1).long()
    per_question = vcr_candidate_scores(output["scores"].detach().float(), qa_t.numel())
    qa_correct = per_question[:, :4].argmax(dim=-1).cpu() == qa_t.cpu()
    qar_correct = vcr_rationale_scores(per_question, qa_t).argmax(dim=-1).cpu() == qar_t.cpu()
    return qa_correct, qar_correct


class _VcrMetric(BaseMetric):
    state_names = ("correct", "total")

    def _select(self, qa_correct: torch.Tensor, qar_correct: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, batch, output: Dict[str, Any]) -> None:
        result = vcr_correct(batch, output)
        if result is None:
            return
        chosen = self._select(*result)
        self._add("correct", chosen.sum())
        self._add("total", torch.tensor(chosen.numel()))

    def compute(self) -> float:
        return float(self.correct / self.total) if self.total > 0 else 0.0


@registry.register_metric("vcr_q_a")
class VcrQA(_VcrMetric):
    """Q->A: the highest-scoring of the 4 answers is the right one."""

    def _select(self, qa_correct, qar_correct):
        return qa_correct


@registry.register_metric("vcr_qa_r")
class VcrQAR(_VcrMetric):
    """QA->R: given the right answer, the highest-scoring of the 4 rationales is the right one."""

    def _select(self, qa_correct, qar_correct):
        return qar_correct


@registry.register_metric("vcr_q_ar")
class VcrQAtoR(_VcrMetric):
    """Q->AR: both the answer and the rationale (given the right answer) are right."""

    def _select(self, qa_correct, qar_correct):
        return qa_correct & qar_correct


# ----------------------------------------------------------------------------------------------
# Image-text retrieval and referring expressions (datasets/builders/retrieval.py, refcoco.py)
# ----------------------------------------------------------------------------------------------
RECALL_KS = (1, 5, 10)
RETRIEVAL_KEYS = tuple(f"{d}_r{k}" for d in ("ir", "tr") for k in RECALL_KS) + ("ir_mean", "tr_mean", "r_mean")


def retrieval_recalls(scores: torch.Tensor, text_gt_image: torch.Tensor, ks=RECALL_KS) -> Dict[str, float]:
    """IR / TR recall@k of a ``[n_texts, n_images]`` score matrix (UNITER's ``itm_eval``).

    - IR (image retrieval, text query): the rank of a text's gt image is the number of images that
      score strictly higher; R@k = fraction of texts with rank < k.
    - TR (text retrieval, image query): an image's rank is that of its best-ranked gt text, i.e. the
      number of texts scoring strictly higher than its best gt text; R@k = fraction of *all* images
      with rank < k (an image without any text counts as a miss, as UNITER divides by all images).

    Ties count in the query's favour (UNITER's ``topk`` breaks them arbitrarily). Returns
    ``ir_r{k}``, ``tr_r{k}``, ``ir_mean``, ``tr_mean`` and ``r_mean`` (mean of the six) as fractions.
    """
    scores = scores.detach().double()
    n_texts, n_images = scores.shape
    gt = text_gt_image.detach().to(scores.device).long().reshape(-1)
    if gt.numel() != n_texts or (n_texts and (gt.min() < 0 or gt.max() >= n_images)):
        raise ValueError(f"text_gt_image must give each of the {n_texts} texts an image index in [0, {n_images})")
    gt_scores = scores.gather(1, gt.unsqueeze(1))
    ir_rank = (scores > gt_scores).sum(dim=1)
    best = torch.full((n_images,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, gt, gt_scores.squeeze(1), reduce="amax", include_self=True)
    tr_rank = (scores > best.unsqueeze(0)).sum(dim=0)
    has_text = torch.isfinite(best)
    out: Dict[str, float] = {}
    for k in ks:
        out[f"ir_r{k}"] = float((ir_rank < k).double().mean()) if n_texts else 0.0
        out[f"tr_r{k}"] = float(((tr_rank < k) & has_text).double().sum() / max(n_images, 1))
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["ir_mean"] + out["tr_mean"]) / 2
    return out


@registry.register_metric("retrieval_recall")
class RetrievalRecall(BaseMetric):
    """IR / TR R@1/5/10 over every (text, image) pair of a retrieval split.

    Reads from each pair batch ``scores`` ([B] or [B, 1]), ``txt_index`` / ``img_index`` /
    ``txt_gt_img`` (LongTensor [B]) and ``n_texts`` / ``n_images`` (ints), as the ``retrieval``
    builder's evaluation batches carry them. State: the ``[n_texts, n_images]`` float32 score matrix
    (each pair is scored once, on one rank, so ranks sum their matrices), the number of pairs scored
    and each text's gt image; activations are never kept. ``compute()`` logs all nine values
    (:data:`RETRIEVAL_KEYS`) and returns ``params.report`` (default ``r_mean``); ``values`` holds them.
    Training batches (query batches with candidates) are ignored.
    """

    def __init__(self, report: str = "r_mean", **params: Any):
        if report not in RETRIEVAL_KEYS:
            raise ConfigError(f"retrieval_recall: params.report must be one of {list(RETRIEVAL_KEYS)}, got {report!r}")
        self.report = report
        self.values: Dict[str, float] = {}
        super().__init__(report=report, **params)

    def reset(self) -> None:
        self.scores: Optional[torch.Tensor] = None
        self.gt_sum: Optional[torch.Tensor] = None
        self.gt_count: Optional[torch.Tensor] = None
        self.scored = torch.zeros((), dtype=torch.float64)

    def update(self, batch, output: Dict[str, Any]) -> None:
        if batch.get("txt_index") is None:
            return
        n_texts, n_images = int(batch["n_texts"]), int(batch["n_images"])
        if self.scores is None:
            self.scores = torch.zeros(n_texts, n_images, dtype=torch.float32)
            self.gt_sum = torch.zeros(n_texts, dtype=torch.float64)
            self.gt_count = torch.zeros(n_texts, dtype=torch.float64)
        t = batch["txt_index"].detach().to("cpu", torch.long).reshape(-1)
        i = batch["img_index"].detach().to("cpu", torch.long).reshape(-1)
        values = output["scores"].detach().float().reshape(-1).cpu()
        if values.numel() != t.numel():
            raise ValueError(f"retrieval_recall got {values.numel()} scores for {t.numel()} pairs")
        self.scores[t, i] = values
        gt = batch["txt_gt_img"].detach().to("cpu", torch.float64).reshape(-1)
        self.gt_sum.index_add_(0, t, gt)
        self.gt_count.index_add_(0, t, torch.ones_like(gt))
        self.scored = self.scored + float(t.numel())

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None) -> None:
        if self.scores is None:
            return
        move = (lambda x: x.to(device)) if device is not None else (lambda x: x)
        self.scores = all_reduce_sum(move(self.scores)).detach().cpu()
        packed = torch.cat([self.gt_sum, self.gt_count, self.scored.reshape(1)])
        packed = all_reduce_sum(move(packed)).detach().cpu()
        n = self.gt_sum.numel()
        self.gt_sum, self.gt_count, self.scored = packed[:n], packed[n : 2 * n], packed[2 * n]

    def compute(self) -> float:
        if self.scores is None:
            return 0.0
        n_texts, n_images = self.scores.shape
        if int(self.scored) != n_texts * n_images or bool((self.gt_count == 0).any()):
            raise ValueError(
                f"retrieval_recall: {int(self.scored)} of the {n_texts} x {n_images} pairs were scored; the "
                f"evaluation loader must visit every pair exactly once (use the retrieval builder's val/test splits)."
            )
        gt = (self.gt_sum / self.gt_count).round().long()
        self.values = retrieval_recalls(self.scores, gt)
        import logging

        logging.getLogger(__name__).info(
            "retrieval (%d texts x %d images): %s", n_texts, n_images,
            ", ".join(f"{k} {100 * v:.2f}" for k, v in self.values.items()),
        )
        return self.values[self.report]


def box_iou_xywh(boxes1: torch.Tensor, boxes2: torch.Tensor, convention: str = "refer") -> torch.Tensor:
    """Elementwise IoU of ``[..., 4]`` boxes ``[x, y, w, h]`` (pixels).

    ``refer``: the refer toolkit's / UNITER's ``computeIoU`` (inclusive pixel coordinates: the
    intersection spans ``x2 - x1 + 1`` with ``x2 = x + w - 1``; union from ``w * h``).
    ``continuous``: plain geometric IoU.
    """
    b1, b2 = boxes1.double(), boxes2.double()
    if convention == "refer":
        x1 = torch.maximum(b1[..., 0], b2[..., 0])
        y1 = torch.maximum(b1[..., 1], b2[..., 1])
        x2 = torch.minimum(b1[..., 0] + b1[..., 2] - 1, b2[..., 0] + b2[..., 2] - 1)
        y2 = torch.minimum(b1[..., 1] + b1[..., 3] - 1, b2[..., 1] + b2[..., 3] - 1)
        overlap = (x1 < x2) & (y1 < y2)
        inter = torch.where(overlap, (x2 - x1 + 1) * (y2 - y1 + 1), torch.zeros_like(x1))
    elif convention == "continuous":
        x1 = torch.maximum(b1[..., 0], b2[..., 0])
        y1 = torch.maximum(b1[..., 1], b2[..., 1])
        x2 = torch.minimum(b1[..., 0] + b1[..., 2], b2[..., 0] + b2[..., 2])
        y2 = torch.minimum(b1[..., 1] + b1[..., 3], b2[..., 1] + b2[..., 3])
        inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    else:
        raise ValueError(f'IoU convention must be "refer" or "continuous", got {convention!r}')
    union = b1[..., 2] * b1[..., 3] + b2[..., 2] * b2[..., 3] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def region_boxes_xywh(img_pos_feat: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Pixel ``[x, y, w, h]`` of every region ``[B, N, 4]`` from the 7-d position features
    (``x1/W, y1/H, x2/W, y2/H, w/W, h/H, area``) and ``image_sizes [B, 2]`` = (W, H)."""
    size = image_sizes.to(img_pos_feat.device, torch.float64)
    w, h = size[:, 0:1], size[:, 1:2]
    pos = img_pos_feat.double()
    return torch.stack([pos[..., 0] * w, pos[..., 1] * h, pos[..., 4] * w, pos[..., 5] * h], dim=-1)


@registry.register_metric("refcoco_accuracy")
class RefcocoAccuracy(BaseMetric):
    """Referring-expression accuracy: the arg-max region's box has IoU > ``threshold`` (0.5) with the
    referred object's gt box. Works with gt-box and detected-box features alike.

    Reads ``scores [B, max_nbb]`` (padding regions at -1e4), ``img_pos_feat``, ``gt_boxes [B, 4]``
    (pixel x, y, w, h) and ``image_sizes [B, 2]`` (W, H), as the ``refcoco`` builder's batches carry
    them. ``convention``: ``refer`` (UNITER's ``computeIoU``) or ``continuous``.
    """

    state_names = ("correct", "total")

    def __init__(self, threshold: float = 0.5, convention: str = "refer", **params: Any):
        box_iou_xywh(torch.zeros(1, 4), torch.zeros(1, 4), convention)  # validate now
        self.threshold, self.convention = float(threshold), convention
        super().__init__(threshold=threshold, convention=convention, **params)

    def update(self, batch, output: Dict[str, Any]) -> None:
        for key in ("gt_boxes", "image_sizes"):
            if batch.get(key) is None:
                raise KeyError(f"refcoco_accuracy needs the batch field '{key}' (the refcoco builder's batches carry it)")
        scores = output["scores"].detach()
        best = scores.argmax(dim=-1)
        boxes = region_boxes_xywh(batch["img_pos_feat"].detach(), batch["image_sizes"].detach())
        predicted = boxes.gather(1, best.to(boxes.device).view(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)
        iou = box_iou_xywh(predicted, batch["gt_boxes"].detach().to(boxes.device), self.convention)
        self._add("correct", (iou > self.threshold).sum())
        self._add("total", torch.tensor(iou.numel()))

    def compute(self) -> float:
        return float(self.correct / self.total) if self.total > 0 else 0.0
