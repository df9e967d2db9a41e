"""``torchvision_frcnn``: torchvision's COCO Faster R-CNN (ResNet-50 FPN) boxes, 2048-d features by
RoIAlign on the ResNet C5 map.

These are NOT the features released UNITER / VILLA / LXMERT checkpoints were trained on (those are
``butd_r101``'s): use them to train from scratch. There is no Visual Genome classifier, so
``soft_labels`` put all mass on background and TSV objects / attributes are -1. Weights: torchvision's
``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` (downloaded by you) or ``random``.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d, roi_align
from torchvision.transforms.functional import pil_to_tensor

from villa_plugin.features.backends import check_options, register_backend
from villa_plugin.features.regions import Regions, background_only_labels
from villa_plugin.features.weights import RANDOM, load_state_dict, load_strict, strip_prefixes

DEFAULTS = {"min_size": 800, "max_size": 1333, "num_boxes": 100, "pool_size": 7}
WHERE_FROM = ("Use torchvision's COCO weights for fasterrcnn_resnet50_fpn (the v1 file "
              "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth, downloaded by you), or --weights random.")
C5_STRIDE = 32


def to_unit_tensor(image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [0, 1] (torchvision's detection models normalise themselves)."""
    return pil_to_tensor(image).float() / 255.0


class TorchvisionFRCNN(nn.Module):
    has_vg_classes = False

    def __init__(self, min_size: int, max_size: int, num_boxes: int, pool_size: int):
        super().__init__()
        body = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), trainable_layers=5)
        self.detector = FasterRCNN(body, num_classes=91, min_size=min_size, max_size=max_size,
                                   box_score_thresh=0.0, box_detections_per_img=num_boxes)
        self.pool_size = pool_size
        self.preprocess = to_unit_tensor

    @torch.inference_mode()
    def extract(self, inputs: List[torch.Tensor]) -> List[Regions]:
        device = next(self.parameters()).device
        return [self._one(x.to(device)) for x in inputs]  # one image per forward: independent of batching

    def _one(self, x: torch.Tensor) -> Regions:
        det = self.detector
        images, _ = det.transform([x])
        c_maps = det.backbone.body(images.tensors)
        features = det.backbone.fpn(c_maps)
        proposals, _ = det.rpn(images, features)
        found, _ = det.roi_heads(features, proposals, images.image_sizes)
        boxes, scores = found[0]["boxes"], found[0]["scores"]
        h, w = images.image_sizes[0]
        if boxes.shape[0] == 0:  # nothing detected: the whole image, confidence 0
            boxes = torch.tensor([[0.0, 0.0, w, h]], device=x.device)
            scores = torch.zeros(1, device=x.device)
        c5 = c_maps[list(c_maps)[-1]]
        pooled = roi_align(c5, [boxes], self.pool_size, spatial_scale=1.0 / C5_STRIDE, sampling_ratio=2, aligned=True)
        feats = pooled.mean(dim=(2, 3))
        order = torch.sort(scores, descending=True, stable=True).indices
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        n = int(order.numel())
        return Regions(boxes=(boxes[order] / scale).clamp(0, 1), features=feats[order], conf=scores[order],
                       soft_labels=background_only_labels(n, x.device))


@register_backend("torchvision_frcnn")
def build(options: dict, weights: str) -> TorchvisionFRCNN:
    opts = check_options("torchvision_frcnn", options, DEFAULTS)
    model = TorchvisionFRCNN(int(opts["min_size"]), int(opts["max_size"]), int(opts["num_boxes"]),
                             int(opts["pool_size"]))
    if weights != RANDOM:
        state = strip_prefixes(load_state_dict(weights, "torchvision Faster R-CNN", WHERE_FROM))
        load_strict(model.detector, state, weights, "torchvision Faster R-CNN", WHERE_FROM)
    return model.eval()
