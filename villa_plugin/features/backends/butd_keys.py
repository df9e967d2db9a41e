"""Key map: PyTorch conversions of the Caffe bottom-up-attention model -> :class:`ButdDetector`.

Supported layout (the detectron2 module tree, as written by the detectron2-based conversions of the
Caffe VG model, e.g. py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl`` and the LXMERT demo's
``frcnn-vg-finetuned`` ``pytorch_model.bin``; an optional ``module.`` / ``model.`` prefix is dropped):

=============================================================  ===========================================
conversion key                                                 ours
=============================================================  ===========================================
``backbone.stem.conv1.weight`` / ``.norm.{weight,bias,...}``     ``backbone.conv1.weight`` / ``backbone.bn1.*``
``backbone.res{2,3,4}.{i}.conv{k}.weight`` / ``.norm.*``          ``backbone.layer{1,2,3}.{i}.conv{k}.weight`` / ``.bn{k}.*``
``backbone.res{2,3,4}.{i}.shortcut.weight`` / ``.norm.*``         ``backbone.layer{1,2,3}.{i}.downsample.0.weight`` / ``.1.*``
``roi_heads.res5.{i}...`` (same block keys)                      ``head.{i}...``
``proposal_generator.rpn_head.{conv,objectness_logits,anchor_deltas}.*``  ``rpn.{conv,objectness,deltas}.*``
``roi_heads.box_predictor.{cls_score,bbox_pred}.*``              ``predictor.{cls_score,bbox_pred}.*``
``roi_heads.box_predictor.cls_embedding.weight``                ``predictor.attr_embed.weight``
``roi_heads.box_predictor.attr_linear{1,2}.*``                  ``predictor.attr_fc{1,2}.*``
=============================================================  ===========================================

``norm`` entries are frozen batch-norm ``weight, bias, running_mean, running_var`` (a
``num_batches_tracked`` is dropped). A Caffe-style two-way RPN classifier (``2A`` objectness rows:
A background then A foreground) is turned into the ``A`` logits ``fg - bg`` (softmax over two = sigmoid
of the difference); a ``bbox_pred`` with background rows (``1601 * 4``) loses them.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

_PREFIXES = ("module.", "model.")
_STAGES = {"res2": "backbone.layer1", "res3": "backbone.layer2", "res4": "backbone.layer3", "res5": "head"}
_RULES = [
    (re.compile(r"^backbone\.stem\.conv1\.weight$"), lambda m: "backbone.conv1.weight"),
    (re.compile(r"^backbone\.stem\.conv1\.norm\.(\w+)$"), lambda m: f"backbone.bn1.{m[1]}"),
    (re.compile(r"^(?:backbone|roi_heads)\.(res[2-5])\.(\d+)\.conv([123])\.weight$"),
     lambda m: f"{_STAGES[m[1]]}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(r"^(?:backbone|roi_heads)\.(res[2-5])\.(\d+)\.conv([123])\.norm\.(\w+)$"),
     lambda m: f"{_STAGES[m[1]]}.{m[2]}.bn{m[3]}.{m[4]}"),
    (re.compile(r"^(?:backbone|roi_heads)\.(res[2-5])\.(\d+)\.shortcut\.weight$"),
     lambda m: f"{_STAGES[m[1]]}.{m[2]}.downsample.0.weight"),
    (re.compile(r"^(?:backbone|roi_heads)\.(res[2-5])\.(\d+)\.shortcut\.norm\.(\w+)$"),
     lambda m: f"{_STAGES[m[1]]}.{m[2]}.downsample.1.{m[3]}"),
    (re.compile(r"^proposal_generator\.rpn_head\.conv\.(\w+)$"), lambda m: f"rpn.conv.{m[1]}"),
    (re.compile(r"^proposal_generator\.rpn_head\.objectness_logits\.(\w+)$"), lambda m: f"rpn.objectness.{m[1]}"),
    (re.compile(r"^proposal_generator\.rpn_head\.anchor_deltas\.(\w+)$"), lambda m: f"rpn.deltas.{m[1]}"),
    (re.compile(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(\w+)$"), lambda m: f"predictor.{m[1]}.{m[2]}"),
    (re.compile(r"^roi_heads\.box_predictor\.cls_embedding\.weight$"), lambda m: "predictor.attr_embed.weight"),
    (re.compile(r"^roi_heads\.box_predictor\.attr_linear([12])\.(\w+)$"), lambda m: f"predictor.attr_fc{m[1]}.{m[2]}"),
]


def map_key(key: str):
    """Our name for a conversion key, or None for keys we do not use."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.endswith("num_batches_tracked"):
        return None
    for pattern, target in _RULES:
        m = pattern.match(key)
        if m:
            return target(m)
    return None


def convert_state_dict(state: Dict[str, torch.Tensor], num_classes: int) -> Dict[str, torch.Tensor]:
    """The conversion's tensors under our names (unknown keys are kept as-is, so a strict load names them)."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        ours = map_key(key)
        out[ours if ours is not None else key] = value.float()
    for name in ("weight", "bias"):
        key = f"rpn.objectness.{name}"
        obj = out.get(key)
        deltas = out.get(f"rpn.deltas.{name}")
        if obj is not None and deltas is not None and obj.shape[0] * 2 == deltas.shape[0]:
            a = obj.shape[0] // 2
            out[key] = obj[a:] - obj[:a]
        box = out.get(f"predictor.bbox_pred.{name}")
        if box is not None and box.shape[0] == num_classes * 4:
            out[f"predictor.bbox_pred.{name}"] = box[4:]
    return out
