"""The bottom-up-attention model written from its specification in plain torch, for the tests.

``conversion_state_dict`` lays out random weights under the detectron2 names a PyTorch conversion of
the Caffe model uses; ``reference_forward`` runs that state dict by those names with ``torch.nn.functional``
and Python loops (no torchvision ops, none of the backend's code), following butd.py's module docstring.
"""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGES = (("res2", 64, 256), ("res3", 128, 512), ("res4", 256, 1024), ("res5", 512, 2048))
CAFFE_MEAN = (102.9801, 115.9465, 122.7717)


def _norm(sd, prefix, channels, gen, small=False):
    sd[prefix + ".weight"] = (torch.rand(channels, generator=gen) * 0.1 + 0.05) if small else \
        (torch.rand(channels, generator=gen) * 0.5 + 0.75)
    sd[prefix + ".bias"] = torch.randn(channels, generator=gen) * 0.05
    sd[prefix + ".running_mean"] = torch.randn(channels, generator=gen) * 0.05
    sd[prefix + ".running_var"] = torch.rand(channels, generator=gen) + 0.5


def _conv(shape, gen):
    fan_out = shape[0] * shape[2] * shape[3]
    return torch.randn(*shape, generator=gen) * math.sqrt(2.0 / fan_out)


def conversion_state_dict(depth: int = 101, num_anchors: int = 12, caffe_rpn: bool = False,
                          bbox_with_background: bool = False, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights under the detectron2 names (``backbone.stem``, ``backbone.res2-4``,
    ``roi_heads.res5``, ``proposal_generator.rpn_head``, ``roi_heads.box_predictor``)."""
    gen = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {"backbone.stem.conv1.weight": _conv((64, 3, 7, 7), gen)}
    _norm(sd, "backbone.stem.conv1.norm", 64, gen)
    cin = 64
    for (stage, mid, cout), blocks in zip(STAGES, BLOCKS[depth]):
        root = "roi_heads" if stage == "res5" else "backbone"
        for i in range(blocks):
            p = f"{root}.{stage}.{i}"
            if i == 0:
                sd[p + ".shortcut.weight"] = _conv((cout, cin, 1, 1), gen)
                _norm(sd, p + ".shortcut.norm", cout, gen)
            for k, shape in ((1, (mid, cin if i == 0 else cout, 1, 1)), (2, (mid, mid, 3, 3)), (3, (cout, mid, 1, 1))):
                sd[f"{p}.conv{k}.weight"] = _conv(shape, gen)
                _norm(sd, f"{p}.conv{k}.norm", shape[0], gen, small=(k == 3))
        cin = cout
    rpn = "proposal_generator.rpn_head"
    sd[rpn + ".conv.weight"] = torch.randn(1024, 1024, 3, 3, generator=gen) * 0.01
    sd[rpn + ".conv.bias"] = torch.zeros(1024)
    n_obj = 2 * num_anchors if caffe_rpn else num_anchors
    sd[rpn + ".objectness_logits.weight"] = torch.randn(n_obj, 1024, 1, 1, generator=gen) * 0.05
    sd[rpn + ".objectness_logits.bias"] = torch.randn(n_obj, generator=gen) * 0.1
    sd[rpn + ".anchor_deltas.weight"] = torch.randn(4 * num_anchors, 1024, 1, 1, generator=gen) * 0.005
    sd[rpn + ".anchor_deltas.bias"] = torch.zeros(4 * num_anchors)
    bp = "roi_heads.box_predictor"
    sd[bp + ".cls_score.weight"] = torch.randn(1601, 2048, generator=gen) * 0.05
    sd[bp + ".cls_score.bias"] = torch.randn(1601, generator=gen) * 0.1
    n_box = 1601 if bbox_with_background else 1600
    sd[bp + ".bbox_pred.weight"] = torch.randn(n_box * 4, 2048, generator=gen) * 0.001
    sd[bp + ".bbox_pred.bias"] = torch.zeros(n_box * 4)
    sd[bp + ".cls_embedding.weight"] = torch.randn(1601, 256, generator=gen) * 0.1
    sd[bp + ".attr_linear1.weight"] = torch.randn(512, 2304, generator=gen) * 0.02
    sd[bp + ".attr_linear1.bias"] = torch.zeros(512)
    sd[bp + ".attr_linear2.weight"] = torch.randn(401, 512, generator=gen) * 0.05
    sd[bp + ".attr_linear2.bias"] = torch.randn(401, generator=gen) * 0.1
    return sd


# -- the reference forward -----------------------------------------------------------------------
def _bn(x, sd, p):
    scale = sd[p + ".weight"] / torch.sqrt(sd[p + ".running_var"] + 1e-5)
    shift = sd[p + ".bias"] - sd[p + ".running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _block(x, sd, p, stride):
    out = F.relu(_bn(F.conv2d(x, sd[p + ".conv1.weight"], stride=stride), sd, p + ".conv1.norm"))
    out = F.relu(_bn(F.conv2d(out, sd[p + ".conv2.weight"], padding=1), sd, p + ".conv2.norm"))
    out = _bn(F.conv2d(out, sd[p + ".conv3.weight"]), sd, p + ".conv3.norm")
    if p + ".shortcut.weight" in sd:
        x = _bn(F.conv2d(x, sd[p + ".shortcut.weight"], stride=stride), sd, p + ".shortcut.norm")
    return F.relu(out + x)


def _stage(x, sd, root, stage, stride):
    i = 0
    while f"{root}.{stage}.{i}.conv1.weight" in sd:
        x = _block(x, sd, f"{root}.{stage}.{i}", stride if i == 0 else 1)
        i += 1
    return x


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _greedy_nms(boxes: List[List[float]], scores: List[float], thresh: float) -> List[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: List[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[j]) <= thresh for j in keep):
            keep.append(i)
    return keep


def _roi_pool(feat, box, out=14, scale=1 / 16):
    """Caffe RoIPooling: rounded RoI corners, bins floor(p * bin) .. ceil((p + 1) * bin), max per bin."""
    c, height, width = feat.shape
    corners = [int(math.floor(float(v) * scale + 0.5)) for v in box]
    x1, y1, x2, y2 = corners
    bin_h = torch.tensor(float(max(y2 - y1 + 1, 1)), dtype=torch.float32) / out
    bin_w = torch.tensor(float(max(x2 - x1 + 1, 1)), dtype=torch.float32) / out
    result = torch.zeros(c, out, out)
    for ph in range(out):
        hs = min(max(int(torch.floor(ph * bin_h)) + y1, 0), height)
        he = min(max(int(torch.ceil((ph + 1) * bin_h)) + y1, 0), height)
        for pw in range(out):
            ws = min(max(int(torch.floor(pw * bin_w)) + x1, 0), width)
            we = min(max(int(torch.ceil((pw + 1) * bin_w)) + x1, 0), width)
            if he > hs and we > ws:
                result[:, ph, pw] = feat[:, hs:he, ws:we].amax(dim=(1, 2))
    return result


def reference_forward(sd, image: np.ndarray, opts: dict) -> Dict[str, torch.Tensor]:
    """The spec, step by step, for one uint8 RGB image [H, W, 3]."""
    h0, w0 = image.shape[:2]
    bgr = torch.from_numpy(image[:, :, ::-1].astype(np.float32).copy()).permute(2, 0, 1)
    bgr = bgr - torch.tensor(CAFFE_MEAN).view(3, 1, 1)
    scale = min(opts["min_size"] / min(h0, w0), opts["max_size"] / max(h0, w0))
    x = F.interpolate(bgr[None], size=(round(h0 * scale), round(w0 * scale)), mode="bilinear", align_corners=False)
    hin, win = x.shape[2:]
    x = F.relu(_bn(F.conv2d(x, sd["backbone.stem.conv1.weight"], stride=2, padding=3), sd, "backbone.stem.conv1.norm"))
    x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
    for stage, stride in (("res2", 1), ("res3", 2), ("res4", 2)):
        x = _stage(x, sd, "backbone", stage, stride)
    feat = x
    rpn = "proposal_generator.rpn_head"
    t = F.relu(F.conv2d(feat, sd[rpn + ".conv.weight"], sd[rpn + ".conv.bias"], padding=1))
    logits = F.conv2d(t, sd[rpn + ".objectness_logits.weight"], sd[rpn + ".objectness_logits.bias"])[0]
    deltas = F.conv2d(t, sd[rpn + ".anchor_deltas.weight"], sd[rpn + ".anchor_deltas.bias"])[0]
    n_anchor, fh, fw = logits.shape
    base = []
    for size in opts["anchor_sizes"]:
        for ratio in opts["anchor_ratios"]:
            aw = math.sqrt(size * size / ratio)
            base.append((aw, ratio * aw))
    cands = []
    for yy in range(fh):
        for xx in range(fw):
            for a, (aw, ah) in enumerate(base):
                d = deltas[4 * a: 4 * a + 4, yy, xx]
                cx, cy = xx * 16.0, yy * 16.0
                dw = min(float(d[2]), math.log(1000.0 / 16))
                dh = min(float(d[3]), math.log(1000.0 / 16))
                pcx, pcy = float(d[0]) * aw + cx, float(d[1]) * ah + cy
                pw, ph = math.exp(dw) * aw, math.exp(dh) * ah
                cands.append((float(logits[a, yy, xx]), [pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2]))
    cands.sort(key=lambda c: -c[0])
    cands = cands[: opts["pre_nms_topk"]]
    boxes, scores = [], []
    for s, b in cands:
        b = [min(max(b[0], 0.0), win), min(max(b[1], 0.0), hin), min(max(b[2], 0.0), win), min(max(b[3], 0.0), hin)]
        if b[2] - b[0] >= 1e-6 and b[3] - b[1] >= 1e-6:
            boxes.append(b)
            scores.append(s)
    keep = _greedy_nms(boxes, scores, opts["rpn_nms"])[: opts["post_nms_topk"]]
    rois = torch.tensor([boxes[i] for i in keep], dtype=torch.float32)
    pooled = torch.stack([_roi_pool(feat[0], r) for r in rois])
    pool5 = _stage(pooled, sd, "roi_heads", "res5", 2).mean(dim=(2, 3))
    bp = "roi_heads.box_predictor"
    cls_prob = F.softmax(F.linear(pool5, sd[bp + ".cls_score.weight"], sd[bp + ".cls_score.bias"]), dim=1)
    label = cls_prob[:, 1:].argmax(dim=1) + 1
    hidden = torch.cat([pool5, sd[bp + ".cls_embedding.weight"][label]], dim=1)
    hidden = F.relu(F.linear(hidden, sd[bp + ".attr_linear1.weight"], sd[bp + ".attr_linear1.bias"]))
    attr_prob = F.softmax(F.linear(hidden, sd[bp + ".attr_linear2.weight"], sd[bp + ".attr_linear2.bias"]), dim=1)
    out_boxes = (rois / scale).tolist()
    max_conf = [0.0] * len(out_boxes)
    for c in range(1, cls_prob.shape[1]):
        col = cls_prob[:, c].tolist()
        for i in _greedy_nms(out_boxes, col, opts["test_nms"]):
            max_conf[i] = max(max_conf[i], col[i])
    order = sorted(range(len(max_conf)), key=lambda i: (-max_conf[i], i))[: opts["num_boxes"]]
    norm = torch.tensor([[b[0] / w0, b[1] / h0, b[2] / w0, b[3] / h0] for b in (out_boxes[i] for i in order)])
    return {"boxes": norm.clamp(0, 1), "features": pool5[order], "conf": torch.tensor([max_conf[i] for i in order]),
            "soft_labels": cls_prob[order], "obj_ids": cls_prob[order, 1:].argmax(dim=1),
            "attr_ids": attr_prob[order, 1:].argmax(dim=1), "num_proposals": len(keep)}
