"""``butd_r101``: the bottom-up-attention Faster R-CNN (Anderson et al. 2018) on torchvision modules/ops.

The features UNITER / VILLA / LXMERT were trained on. Architecture (Caffe model, Visual Genome):

- input: BGR 0-255 minus the Caffe means, resized so the shorter side is ``min_size`` (600) and the
  longer at most ``max_size`` (1000);
- backbone: Caffe ResNet-101 C4 (stride in the 1x1 convolutions, frozen batch norm, 3x3/2 max-pool with
  ``ceil_mode``), stride 16, 1024 channels;
- RPN: 3x3 conv + ReLU, one objectness logit and 4 deltas per anchor (``anchor_sizes`` x
  ``anchor_ratios``, sizes outer; box-coder weights 1); top ``pre_nms_topk`` (6000), NMS ``rpn_nms``
  (0.7), top ``post_nms_topk`` (300) proposals;
- RoI head: RoIPool 14x14 at 1/16, the res5 stage (3 blocks, first stride 2), mean -> 2048-d ``pool5``;
  ``cls_score`` -> softmax over 1601 classes (background first); attributes: the argmax foreground
  class's 256-d embedding concatenated to pool5 -> Linear 512 -> ReLU -> Linear 401 -> softmax;
- selection (BUTD's ``generate_tsv`` / UNITER's ``generate_npz``): output boxes are the proposals in
  original-image pixels; per foreground class NMS (``test_nms`` 0.3) over them; a box's confidence is
  its best score among classes it survived (the max-class confidence rule); the top ``num_boxes``
  (100) by that confidence are kept.

Weights: a conversion of the Caffe model, mapped by :mod:`.butd_keys` (``.pkl`` read without
unpickling objects, ``.pth``/``.bin`` with ``weights_only=True``, ``.safetensors``), or ``random``.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, clip_boxes_to_image, nms, remove_small_boxes, roi_pool

from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.features.backends import check_options, register_backend
from villa_plugin.features.backends.butd_keys import convert_state_dict
from villa_plugin.features.regions import NUM_VG_CLASSES, Regions, max_class_confidence, sort_by_conf
from villa_plugin.features.weights import RANDOM, load_state_dict, load_strict

CAFFE_BGR_MEAN = (102.9801, 115.9465, 122.7717)
NUM_ATTRIBUTES = 401  # "no attribute" + 400
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
DEFAULTS = {
    "depth": 101, "min_size": 600, "max_size": 1000, "anchor_sizes": [64, 128, 256, 512],
    "anchor_ratios": [0.5, 1.0, 2.0], "pre_nms_topk": 6000, "post_nms_topk": 300, "rpn_nms": 0.7,
    "test_nms": 0.3, "num_boxes": 100,
}
WHERE_FROM = (
    "butd_r101 needs a PyTorch conversion of the Caffe bottom-up-attention ResNet-101 VG model with "
    "attributes, in the detectron2 layout (py-bottom-up-attention's faster_rcnn_from_caffe_attr.pkl, or "
    "the LXMERT demo's frcnn-vg-finetuned pytorch_model.bin); see docs/own_data.md, 'Weights'."
)
BBOX_CLIP = math.log(1000.0 / 16)


class CaffePreprocess:
    """PIL RGB -> (BGR mean-subtracted float [3, h, w] at the test scale, the scale, the image's (w, h))."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image) -> Tuple[torch.Tensor, float, Tuple[int, int]]:
        rgb = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        bgr = rgb.flip(0) - torch.tensor(CAFFE_BGR_MEAN).view(3, 1, 1)
        h, w = bgr.shape[1:]
        scale = min(self.min_size / min(h, w), self.max_size / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(bgr[None], size=size, mode="bilinear", align_corners=False)[0]
        return x, scale, (w, h)


class CaffeBottleneck(nn.Module):
    """MSRA/Caffe ResNet bottleneck: the stride sits in the first 1x1 convolution."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, stride, bias=False), FrozenBatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, 1, 1, bias=False), FrozenBatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), FrozenBatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), FrozenBatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _stage(blocks: int, cin: int, mid: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[CaffeBottleneck(cin if i == 0 else cout, mid, cout, stride if i == 0 else 1)
                           for i in range(blocks)])


class CaffeResNetC4(nn.Module):
    def __init__(self, blocks: Sequence[int]):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), FrozenBatchNorm2d(64)
        self.layer1 = _stage(blocks[0], 64, 64, 256, 1)
        self.layer2 = _stage(blocks[1], 256, 128, 512, 2)
        self.layer3 = _stage(blocks[2], 512, 256, 1024, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 0, ceil_mode=True)
        return self.layer3(self.layer2(self.layer1(x)))


class RPNHead(nn.Module):
    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)


class Predictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_score = nn.Linear(2048, NUM_VG_CLASSES)
        self.bbox_pred = nn.Linear(2048, (NUM_VG_CLASSES - 1) * 4)  # loaded, unused: BUTD keeps proposals
        self.attr_embed = nn.Embedding(NUM_VG_CLASSES, 256)
        self.attr_fc1 = nn.Linear(2048 + 256, 512)
        self.attr_fc2 = nn.Linear(512, NUM_ATTRIBUTES)


def base_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
    """Zero-centred anchors ``[A, 4]``: sizes outer, ratios (h / w) inner."""
    out = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(base: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """All anchors ``[H * W * A, 4]`` ordered (y, x, anchor)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32) * stride,
                            torch.arange(width, dtype=torch.float32) * stride, indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = deltas[:, 2].clamp(max=BBOX_CLIP), deltas[:, 3].clamp(max=BBOX_CLIP)
    pcx, pcy = dx * widths + cx, dy * heights + cy
    pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=1)


class ButdDetector(nn.Module):
    has_vg_classes = True
    stride = 16

    def __init__(self, opts: dict):
        super().__init__()
        depth = int(opts["depth"])
        if depth not in STAGE_BLOCKS:
            raise ConfigError(f"butd_r101: depth {depth} is not supported (101 is the released model; 50 for tests).")
        blocks = STAGE_BLOCKS[depth]
        self.opts = opts
        self.backbone = CaffeResNetC4(blocks)
        self.register_buffer("anchors", base_anchors(opts["anchor_sizes"], opts["anchor_ratios"]), persistent=False)
        self.rpn = RPNHead(1024, self.anchors.shape[0])
        self.head = _stage(blocks[3], 1024, 512, 2048, 2)
        self.predictor = Predictor()
        self.preprocess = CaffePreprocess(int(opts["min_size"]), int(opts["max_size"]))
        self._random_init()

    def _random_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, CaffeBottleneck):
                m.bn3.weight.fill_(0.1)  # keeps a random net's activations bounded (random weights only)
        for conv in (self.rpn.objectness, self.rpn.deltas):
            nn.init.normal_(conv.weight, std=0.01)
        for lin in (self.predictor.cls_score, self.predictor.attr_fc1, self.predictor.attr_fc2):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)

    def load_conversion(self, state: dict, path: str) -> None:
        mapped = convert_state_dict(state, NUM_VG_CLASSES)
        obj = mapped.get("rpn.objectness.weight")
        if obj is not None and obj.shape[0] != self.anchors.shape[0]:
            raise CheckpointError(
                f"{path}: the RPN predicts {obj.shape[0]} anchors per position but anchor_sizes x anchor_ratios "
                f"give {self.anchors.shape[0]}; set the backend options anchor_sizes / anchor_ratios to the "
                f"conversion's anchor generator.")
        load_strict(self, mapped, path, "butd_r101", WHERE_FROM)

    # -- forward ----------------------------------------------------------------------------------
    def proposals(self, feat: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
        t = F.relu(self.rpn.conv(feat))
        logits = self.rpn.objectness(t)[0].permute(1, 2, 0).reshape(-1)              # (y, x, a)
        a = self.anchors.shape[0]
        h, w = feat.shape[2:]
        deltas = self.rpn.deltas(t)[0].view(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
        anchors = grid_anchors(self.anchors, h, w, self.stride).to(feat.device)
        k = min(int(self.opts["pre_nms_topk"]), logits.numel())
        top = torch.topk(logits, k).indices
        boxes = clip_boxes_to_image(decode_boxes(deltas[top], anchors[top]), image_hw)
        scores = logits[top]
        keep = remove_small_boxes(boxes, 1e-6)
        boxes, scores = boxes[keep], scores[keep]
        keep = nms(boxes, scores, float(self.opts["rpn_nms"]))[: int(self.opts["post_nms_topk"])]
        if keep.numel() == 0:  # every proposal degenerate: the whole image is the one region
            return torch.tensor([[0.0, 0.0, image_hw[1], image_hw[0]]], device=feat.device)
        return boxes[keep]

    def detect(self, x: torch.Tensor, scale: float):
        """Everything for one preprocessed image: proposals (input pixels), pool5, class and attribute probs."""
        feat = self.backbone(x[None])
        rois = self.proposals(feat, tuple(x.shape[1:]))
        pooled = roi_pool(feat, [rois], output_size=14, spatial_scale=1.0 / self.stride)
        pool5 = self.head(pooled).mean(dim=(2, 3))
        cls_prob = F.softmax(self.predictor.cls_score(pool5), dim=1)
        label = cls_prob[:, 1:].argmax(dim=1) + 1
        hidden = F.relu(self.predictor.attr_fc1(torch.cat([pool5, self.predictor.attr_embed(label)], dim=1)))
        attr_prob = F.softmax(self.predictor.attr_fc2(hidden), dim=1)
        return rois / scale, pool5, cls_prob, attr_prob

    @torch.inference_mode()
    def extract(self, inputs: List[Tuple[torch.Tensor, float, Tuple[int, int]]]) -> List[Regions]:
        device = self.anchors.device
        return [self._one(x.to(device), scale, wh) for x, scale, wh in inputs]  # one image per forward, as BUTD

    def _one(self, x: torch.Tensor, scale: float, image_wh: Tuple[int, int]) -> Regions:
        boxes, pool5, cls_prob, attr_prob = self.detect(x, scale)
        conf = max_class_confidence(boxes, cls_prob, float(self.opts["test_nms"]))
        order = sort_by_conf(conf)[: int(self.opts["num_boxes"])]
        w, h = image_wh
        size = torch.tensor([w, h, w, h], device=boxes.device)
        obj_conf, obj_ids = cls_prob[order, 1:].max(dim=1)
        attr_conf, attr_ids = attr_prob[order, 1:].max(dim=1)
        return Regions(boxes=(boxes[order] / size).clamp(0, 1), features=pool5[order], conf=conf[order],
                       soft_labels=cls_prob[order], obj_ids=obj_ids, obj_conf=obj_conf,
                       attr_ids=attr_ids, attr_conf=attr_conf)


@register_backend("butd_r101")
def build(options: dict, weights: str) -> ButdDetector:
    opts = check_options("butd_r101", options, DEFAULTS)
    model = ButdDetector(opts)
    if weights != RANDOM:
        model.load_conversion(load_state_dict(weights, "butd_r101", WHERE_FROM), weights)
    return model.eval()
