"""Every backend builds with random weights and returns well-formed regions; weights load through the
documented layouts; a missing file or an unknown option is an error naming it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from butd_spec import conversion_state_dict
from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.features.backends import build_backend
from villa_plugin.features.backends.butd import ButdDetector, DEFAULTS as BUTD_DEFAULTS
from villa_plugin.features.backends.butd_keys import convert_state_dict, map_key
from villa_plugin.features.regions import NUM_VG_CLASSES

SMALL = {
    "grid": {"image_size": 64, "grid_size": 3},
    "torchvision_frcnn": {"min_size": 64, "max_size": 96, "num_boxes": 7},
    "butd_r101": {"depth": 50, "min_size": 64, "max_size": 96, "post_nms_topk": 12, "num_boxes": 5},
}


def _image(h=48, w=72, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_backend_regions_are_well_formed(name):
    torch.manual_seed(0)
    backend = build_backend(name, SMALL[name], "random")
    out = backend.extract([backend.preprocess(_image()), backend.preprocess(_image(64, 40, 1))])
    assert len(out) == 2
    for regions in out:
        n = len(regions)
        assert n >= 1
        assert regions.features.shape == (n, 2048) and regions.soft_labels.shape == (n, NUM_VG_CLASSES)
        assert torch.isfinite(regions.features).all()
        b = regions.boxes
        assert b.shape == (n, 4) and (b >= 0).all() and (b <= 1).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert torch.all(regions.conf[:-1] >= regions.conf[1:])  # sorted by confidence
        torch.testing.assert_close(regions.soft_labels.sum(1), torch.ones(n))
    if name == "grid":
        assert len(out[0]) == 9 and torch.equal(out[0].boxes[4], torch.tensor([1 / 3, 1 / 3, 2 / 3, 2 / 3]))
    if name == "butd_r101":
        assert len(out[0]) == 5 and out[0].obj_ids is not None and out[0].attr_ids.max() < 400


def test_butd_key_map_covers_the_released_resnet101_structure():
    """Every tensor of a ResNet-101 conversion maps onto exactly the model's tensors, with their shapes."""
    state = conversion_state_dict(depth=101, num_anchors=12)
    mapped = convert_state_dict(state, NUM_VG_CLASSES)
    own = ButdDetector(dict(BUTD_DEFAULTS)).state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert map_key("module.backbone.res4.22.conv3.norm.running_var") == "backbone.layer3.22.bn3.running_var"
    assert map_key("roi_heads.res5.0.shortcut.norm.bias") == "head.0.downsample.1.bias"
    assert map_key("roi_heads.box_predictor.cls_embedding.weight") == "predictor.attr_embed.weight"
    assert map_key("backbone.res2.0.conv1.norm.num_batches_tracked") is None


def test_butd_key_map_converts_caffe_rpn_and_background_box_rows():
    state = conversion_state_dict(depth=50, num_anchors=12, caffe_rpn=True, bbox_with_background=True)
    mapped = convert_state_dict(state, NUM_VG_CLASSES)
    two_way = state["proposal_generator.rpn_head.objectness_logits.weight"]
    torch.testing.assert_close(mapped["rpn.objectness.weight"], two_way[12:] - two_way[:12])
    assert mapped["predictor.bbox_pred.weight"].shape[0] == 1600 * 4
    torch.testing.assert_close(mapped["predictor.bbox_pred.weight"],
                               state["roi_heads.box_predictor.bbox_pred.weight"][4:])


def test_butd_loads_pkl_and_safetensors_and_rejects_wrong_anchor_count(tmp_path):
    import pickle

    from safetensors.torch import save_file

    state = conversion_state_dict(depth=50, num_anchors=12)
    pkl = tmp_path / "conv.pkl"
    with open(pkl, "wb") as fh:  # detectron2's format: {"model": {name: ndarray}}
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, fh)
    model = build_backend("butd_r101", {"depth": 50}, str(pkl))
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, state["backbone.res2.0.conv1.weight"])
    st = tmp_path / "conv.safetensors"
    save_file(state, str(st))
    build_backend("butd_r101", {"depth": 50}, str(st))
    with pytest.raises(CheckpointError, match="anchor_sizes"):
        build_backend("butd_r101", {"depth": 50, "anchor_sizes": [64, 128]}, str(pkl))


def test_pkl_with_arbitrary_objects_is_refused(tmp_path):
    import pickle

    bad = tmp_path / "evil.pkl"
    with open(bad, "wb") as fh:
        pickle.dump({"model": {"x": ConfigError("not an array")}}, fh)
    with pytest.raises(CheckpointError, match="refusing"):
        build_backend("butd_r101", {"depth": 50}, str(bad))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_missing_weights_file_names_it_and_the_source(name, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError) as err:
        build_backend(name, SMALL[name], str(missing))
    assert str(missing) in str(err.value)
    assert {"grid": "torchvision", "torchvision_frcnn": "fasterrcnn_resnet50_fpn",
            "butd_r101": "py-bottom-up-attention"}[name] in str(err.value)


def test_torchvision_weight_files_round_trip(tmp_path):
    """A torchvision-layout state dict (as torchvision saves it) loads into grid and torchvision_frcnn."""
    from torchvision.models import resnet50
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(1)
    net = resnet50(weights=None)
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    grid = build_backend("grid", {"image_size": 64}, str(tmp_path / "resnet50.pth"))
    torch.testing.assert_close(grid.body[7][2].conv3.weight, net.layer4[2].conv3.weight)
    det = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    torch.save(det.state_dict(), tmp_path / "frcnn.pth")
    ours = build_backend("torchvision_frcnn", {"min_size": 64, "max_size": 96}, str(tmp_path / "frcnn.pth"))
    torch.testing.assert_close(ours.detector.roi_heads.box_predictor.cls_score.weight,
                               det.roi_heads.box_predictor.cls_score.weight)
    torch.save({"conv1.weight": net.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing"):
        build_backend("grid", {}, str(tmp_path / "partial.pth"))


def test_unknown_backend_or_option_is_an_error():
    with pytest.raises(ConfigError, match="grid"):
        build_backend("detectron", {}, "random")
    with pytest.raises(ConfigError, match="grid_size"):
        build_backend("grid", {"grid_sise": 3}, "random")
