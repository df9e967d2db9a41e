"""Referring expressions' metric ``refcoco_accuracy`` and the box helpers it shares with the dataset."""
from __future__ import annotations

from typing import Any, Dict

import torch

from villa_plugin.metrics import BaseMetric
from villa_plugin.registry import registry


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
