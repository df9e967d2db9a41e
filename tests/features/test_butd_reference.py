"""Done-when of issue 11: with the same weights, butd_r101's boxes and features equal an independent
reference forward (tests/features/butd_spec.py) built from the same state dict.

Compared, for one 48x80 image (resized to 64x107 by the 64/128 test scale), ResNet-101 C4 + res5 as
released: the selected boxes (normalised), the 2048-d pool5 features, the max-class confidences, the
1601-way class distributions and the object / attribute argmaxes. The state dict is written in the
conversion's detectron2 layout, saved, and loaded by the backend through its key map.
"""
from __future__ import annotations

import numpy as np
import torch

from butd_spec import conversion_state_dict, reference_forward
from villa_plugin.features.backends import build_backend

OPTS = {"depth": 101, "min_size": 64, "max_size": 128, "anchor_sizes": [32, 64, 128], "anchor_ratios": [0.5, 1.0, 2.0],
        "pre_nms_topk": 6000, "post_nms_topk": 5, "rpn_nms": 0.7, "test_nms": 0.3, "num_boxes": 4}


def test_butd_r101_matches_the_reference_forward(tmp_path):
    torch.manual_seed(0)
    state = conversion_state_dict(depth=101, num_anchors=9, seed=3)
    path = tmp_path / "butd_conversion.pth"
    torch.save(state, path)
    image = (np.random.RandomState(1).rand(48, 80, 3) * 255).astype(np.uint8)
    from PIL import Image

    backend = build_backend("butd_r101", OPTS, str(path))
    ours = backend.extract([backend.preprocess(Image.fromarray(image))])[0]
    ref = reference_forward(state, image, OPTS)

    assert ref["num_proposals"] == 5 and len(ours) == 4  # more proposals than kept boxes: the rule selects
    torch.testing.assert_close(ours.boxes, ref["boxes"], rtol=0, atol=1e-5)
    scale = ref["features"].abs().max()
    assert scale > 0
    torch.testing.assert_close(ours.features, ref["features"], rtol=1e-4, atol=1e-5 * float(scale))
    torch.testing.assert_close(ours.conf, ref["conf"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.soft_labels, ref["soft_labels"], rtol=1e-4, atol=1e-7)
    assert torch.equal(ours.obj_ids, ref["obj_ids"]) and torch.equal(ours.attr_ids, ref["attr_ids"])
    assert len(set(ours.conf.tolist())) > 1  # the confidences differ, so the order was tested
