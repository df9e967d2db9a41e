"""Retrieval's metric ``retrieval_recall`` (R@1/5/10 both ways) and ``retrieval_recalls``."""
from __future__ import annotations

import logging

from typing import Any, Callable, Dict, Optional

import torch

from villa_plugin.common.errors import ConfigError
from villa_plugin.metrics import BaseMetric
from villa_plugin.registry import registry


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
        logging.getLogger(__name__).info(
            "retrieval (%d texts x %d images): %s", n_texts, n_images,
            ", ".join(f"{k} {100 * v:.2f}" for k, v in self.values.items()),
        )
        return self.values[self.report]
