"""What a backend returns for one image, and how it becomes an img_db record or a TSV row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from torchvision.ops import batched_nms

NUM_VG_CLASSES = 1601  # background + 1600 Visual Genome objects (UNITER's soft_labels width)
FEATURE_DIM = 2048


@dataclass
class Regions:
    """Regions of one image, sorted by ``conf`` descending (as BUTD stores them).

    ``boxes`` are ``x1, y1, x2, y2`` normalised by the image width / height (so they hold for the
    original image whatever resizing the backend did). ``soft_labels`` is the VG class distribution
    (background first); backends without one store background = 1 and say so. ``obj_*`` / ``attr_*``
    are the 0-based VG object / attribute argmax and its probability (-1 / 0 when the backend has none).
    """

    boxes: torch.Tensor          # [n, 4] float, in [0, 1]
    features: torch.Tensor       # [n, 2048]
    conf: torch.Tensor           # [n]
    soft_labels: torch.Tensor    # [n, 1601]
    obj_ids: Optional[torch.Tensor] = None
    obj_conf: Optional[torch.Tensor] = None
    attr_ids: Optional[torch.Tensor] = None
    attr_conf: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def first(self, n: int) -> "Regions":
        """The ``n`` most confident regions."""
        return Regions(**{k: (v[:n] if v is not None else None) for k, v in self.__dict__.items()})

    def cpu(self) -> "Regions":
        return Regions(**{k: (v.detach().float().cpu() if v is not None and v.is_floating_point()
                              else (v.detach().cpu() if v is not None else None))
                          for k, v in self.__dict__.items()})


def norm_bb_6d(boxes: torch.Tensor) -> np.ndarray:
    """UNITER's 6-d ``norm_bb``: ``x1, y1, x2, y2, w, h`` (all divided by the image width / height)."""
    b = boxes.float().clamp(0.0, 1.0)
    wh = b[:, 2:4] - b[:, 0:2]
    return torch.cat([b, wh], dim=1).numpy()


def to_img_db_record(regions: Regions) -> Dict[str, np.ndarray]:
    """The per-image record of UNITER's ``.npz`` (float32 here; the img_db writer stores fp16)."""
    return {
        "features": regions.features.float().numpy(),
        "norm_bb": norm_bb_6d(regions.boxes),
        "conf": regions.conf.float().numpy().reshape(-1, 1),
        "soft_labels": regions.soft_labels.float().numpy(),
    }


def background_only_labels(n: int, device=None) -> torch.Tensor:
    """``soft_labels`` for a backend with no VG classifier: all mass on background (column 0)."""
    labels = torch.zeros(n, NUM_VG_CLASSES, device=device)
    labels[:, 0] = 1.0
    return labels


def max_class_confidence(boxes: torch.Tensor, cls_prob: torch.Tensor, nms_thresh: float) -> torch.Tensor:
    """BUTD's confidence rule: per foreground class, NMS over ``boxes`` with that class's scores; a box's
    confidence is its highest score among the classes for which it survived NMS (0 if none)."""
    n, num_classes = cls_prob.shape
    scores = cls_prob[:, 1:]
    flat_scores = scores.reshape(-1)
    flat_boxes = boxes[:, None, :].expand(n, num_classes - 1, 4).reshape(-1, 4)
    classes = torch.arange(num_classes - 1, device=boxes.device).repeat(n)
    keep = batched_nms(flat_boxes, flat_scores, classes, nms_thresh)
    max_conf = torch.zeros(n, dtype=cls_prob.dtype, device=cls_prob.device)
    return max_conf.scatter_reduce(0, keep // (num_classes - 1), flat_scores[keep], reduce="amax")


def sort_by_conf(conf: torch.Tensor) -> torch.Tensor:
    """Indices by ``conf`` descending; ties keep their original order (deterministic)."""
    return torch.sort(conf, descending=True, stable=True).indices
