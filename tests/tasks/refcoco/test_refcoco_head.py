"""Referring-expression heads ``re`` / ``re_mlp2``: keys, region read-out, -1e4 padding, losses,
the adversarial KL over regions, and the IoU accuracy metric."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uniter_testlib import make_batch, tiny_model_config
from villa_plugin.adversarial.engine import FreeATEngine
from villa_plugin.adversarial.losses import reduce_kl, symmetric_kl
from villa_plugin.common.sample_list import SampleList
from villa_plugin.tasks.refcoco.metrics import RefcocoAccuracy, box_iou_xywh, region_boxes_xywh
from villa_plugin.models.registered import uniter_layout
from villa_plugin.tasks.refcoco.head import (
    PAD_SCORE,
    ReferringRankLoss,
    ReHead,
    ReMlp2Head,
    region_outputs,
    sample_negative_regions,
)
from villa_plugin.models.registered import UNITER

H = 32


def build(head="re", dropout=0.1, losses=None, seed=0):
    torch.manual_seed(seed)
    model = UNITER(tiny_model_config(head=head, num_labels=1, dropout=dropout,
                                     losses=losses or [{"type": "cross_entropy", "params": {"reduction": "sum"}}]))
    model.build()
    model.init_losses()
    return model


def re_batch(txt_lens=(5, 3, 7), num_bbs=(4, 6, 2), targets=(1, 5, 0), seed=0):
    batch = make_batch(list(txt_lens), list(num_bbs), seed=seed)
    batch["targets"] = torch.as_tensor(targets)
    batch["dataset_name"] = "refcoco"
    return batch


def test_head_keys_shapes_and_kl_reduction():
    one = build("re")
    assert one.head_module_name == "re_output" and one.kl_reduction == "sum_classes_mean"
    keys = {k: tuple(v.shape) for k, v in one.state_dict().items() if k.startswith("re_output")}
    assert keys == {"re_output.weight": (1, H), "re_output.bias": (1,)}
    two = build("re_mlp2")
    keys = {k: tuple(v.shape) for k, v in two.state_dict().items() if k.startswith("re_output")}
    assert keys == {"re_output.0.weight": (H, H), "re_output.0.bias": (H,), "re_output.2.weight": (H,),
                    "re_output.2.bias": (H,), "re_output.3.weight": (1, H), "re_output.3.bias": (1,)}
    assert isinstance(two.re_output[1], torch.nn.GELU) and isinstance(two.re_output[2], torch.nn.LayerNorm)


def test_region_outputs_read_each_rows_own_region_positions():
    batch = re_batch()
    seq = torch.randn(3, int(batch["attn_masks"].size(1)), H)
    hidden, pad = region_outputs(seq, uniter_layout(batch))
    assert hidden.shape == (3, 6, H)
    for i, (tl, nbb) in enumerate(zip(batch["txt_lens"], batch["num_bbs"])):
        assert torch.equal(hidden[i, :nbb], seq[i, tl : tl + nbb])  # packed: [CLS] text [SEP] regions
        assert pad[i].tolist() == [k >= nbb for k in range(6)]
    # padded concatenation (no gather_index): regions follow the padded text
    batch["gather_index"] = None
    seq = torch.randn(3, 7 + 6, H)
    hidden, _ = region_outputs(seq, uniter_layout(batch))
    assert torch.equal(hidden[1, :6], seq[1, 7:13])


@pytest.mark.parametrize("seed", range(5))
def test_padding_regions_are_minus_1e4_and_never_win(seed):
    model = build(seed=seed)
    with torch.no_grad():  # make pad positions attractive if they were not masked: score = +sum(hidden)
        model.re_output.weight.fill_(1.0)
    model.eval()
    batch = re_batch(seed=seed)
    scores = model(batch)["scores"]
    assert scores.shape == (3, 6)
    for i, nbb in enumerate(batch["num_bbs"]):
        assert (scores[i, nbb:] == PAD_SCORE).all()
        assert int(scores[i].argmax()) < nbb
        assert (scores[i, :nbb] != PAD_SCORE).all()
    assert F.softmax(scores, dim=-1)[0, 4:].sum() == 0  # probability exactly 0 in fp32


def test_cls_loss_sums_over_the_batch_or_averages():
    model = build()
    batch = re_batch()
    out = model(batch)
    expected = F.cross_entropy(out["scores"].float(), batch["targets"], reduction="sum")
    assert torch.allclose(out["losses"]["train/refcoco/cross_entropy"], expected)
    mean_model = build(losses=[{"type": "cross_entropy", "params": {"reduction": "mean"}}])
    out = mean_model(batch)
    assert torch.allclose(out["losses"]["train/refcoco/cross_entropy"], F.cross_entropy(out["scores"], batch["targets"]))


def test_rank_loss_on_hand_numbers():
    scores = torch.tensor([[2.0, 1.0, 0.5, PAD_SCORE], [0.0, 3.0, -1.0, 1.0]])
    batch = SampleList(targets=torch.tensor([0, 2]), num_bbs=[3, 4])
    loss = ReferringRankLoss(margin=0.2, hard_ratio=1.0)(batch, {"scores": scores})  # always the hardest wrong region
    s = torch.sigmoid
    first = max(0.0, 0.2 + s(torch.tensor(1.0)) - s(torch.tensor(2.0)))
    second = max(0.0, 0.2 + s(torch.tensor(3.0)) - s(torch.tensor(-1.0)))
    assert math.isclose(float(loss), float(first + second), rel_tol=1e-6)
    mean = ReferringRankLoss(margin=0.2, hard_ratio=1.0, reduction="mean")(batch, {"scores": scores})
    assert math.isclose(float(mean), float(first + second) / 2, rel_tol=1e-6)
    ignored = ReferringRankLoss(hard_ratio=1.0)(SampleList(targets=torch.tensor([0, -100]), num_bbs=[3, 4]), {"scores": scores})
    assert math.isclose(float(ignored), float(first), rel_tol=1e-6)  # -100: no usable target, skipped


def test_easy_negatives_are_uniform_wrong_real_regions():
    torch.manual_seed(0)
    scores = torch.zeros(2000, 5)
    targets = torch.full((2000,), 2)
    num_bbs = torch.full((2000,), 4)
    negative = sample_negative_regions(scores, targets, num_bbs, hard_ratio=0.0)
    counts = torch.bincount(negative, minlength=5)
    assert counts[2] == 0 and counts[4] == 0  # never the target, never a padding region
    assert all(580 < int(c) < 760 for c in counts[[0, 1, 3]])  # ~2000/3 each


def test_symmetric_kl_over_regions_is_zero_at_delta_zero_and_ignores_padding():
    model = build(dropout=0.0)
    batch = re_batch()
    clean = model(batch)["scores"]
    shapes = model.perturbation_shapes(batch)
    same = model(batch, perturbation={"text": torch.zeros(shapes["text"]), "image": torch.zeros(shapes["image"])})["scores"]
    assert float(reduce_kl(symmetric_kl(same, clean), model.kl_reduction).detach()) == 0.0
    torch.manual_seed(1)
    moved = model(batch, perturbation={"text": 0.5 * torch.randn(shapes["text"]), "image": None})["scores"]
    kl = symmetric_kl(moved, clean).detach()
    assert float(kl.sum()) > 0
    for i, nbb in enumerate(batch["num_bbs"]):
        assert (kl[i, nbb:] == 0).all()
    # the engine's first step (delta = 0) sees exactly the clean logits: KL statistic 0
    engine = FreeATEngine({"adv_training": True, "adv_modality": ["text"], "adv_steps": 1, "adv_lr_txt": 1e-3})
    stats = engine.step(model, batch, backward=lambda loss, retain_graph=False: loss.backward(), kl_reduction=model.kl_reduction)
    assert float(stats["kl"]) == 0.0


def test_iou_conventions_on_hand_boxes():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 10.0, 10.0]])
    assert math.isclose(float(box_iou_xywh(a, b, "continuous")), 50 / 150)
    # refer / UNITER computeIoU: inclusive pixels, intersection (9-5+1) x (9-0+1) = 50, union 100+100-50
    assert math.isclose(float(box_iou_xywh(a, b, "refer")), 50 / 150)
    c = torch.tensor([[10.0, 0.0, 10.0, 10.0]])  # touching: continuous 0; refer: x1 = 10 > x2 = 9 -> 0
    assert float(box_iou_xywh(a, c, "continuous")) == 0 and float(box_iou_xywh(a, c, "refer")) == 0
    d = torch.tensor([[2.0, 2.0, 4.0, 4.0]])  # refer: (5-2+1)^2 = 16 / (100 + 16 - 16)
    assert math.isclose(float(box_iou_xywh(a, d, "refer")), 16 / 100)
    with pytest.raises(ValueError):
        box_iou_xywh(a, d, "nope")


def test_refcoco_accuracy_on_hand_examples():
    # two images 100x50; regions given as normalised (x1, y1, x2, y2, w, h, area)
    def pos(x, y, w, h, W=100.0, H=50.0):
        return [x / W, y / H, (x + w) / W, (y + h) / H, w / W, h / H, (w / W) * (h / H)]

    img_pos_feat = torch.tensor([
        [pos(0, 0, 50, 50), pos(50, 0, 50, 50), [0.0] * 7],
        [pos(0, 0, 20, 20), pos(20, 20, 30, 30), pos(60, 0, 40, 40)],
    ])
    batch = SampleList(
        img_pos_feat=img_pos_feat,
        gt_boxes=torch.tensor([[50.0, 0.0, 50.0, 50.0], [0.0, 0.0, 22.0, 22.0]]),
        image_sizes=torch.tensor([[100.0, 50.0], [100.0, 50.0]]),
    )
    metric = RefcocoAccuracy()
    metric.update(batch, {"scores": torch.tensor([[0.1, 0.9, PAD_SCORE], [0.2, 0.8, 0.1]])})
    # row 0 picks the right box (IoU 1); row 1 picks region 1 (IoU 0 with the gt box)
    assert metric.compute() == 0.5
    metric.update(batch, {"scores": torch.tensor([[0.9, 0.1, PAD_SCORE], [0.9, 0.0, 0.1]])})
    # row 0 now wrong (IoU 0); row 1 region 0: refer IoU 400/484 > 0.5 -> right
    assert metric.compute() == 0.5 and float(metric.total) == 4
    boxes = region_boxes_xywh(img_pos_feat, batch["image_sizes"])
    assert torch.allclose(boxes[1, 2], torch.tensor([60.0, 0.0, 40.0, 40.0], dtype=torch.float64), atol=1e-4)


def test_registered_losses_and_heads_are_listed():
    from villa_plugin.registry import registry

    assert registry.get_head_class("re") is ReHead and registry.get_head_class("re_mlp2") is ReMlp2Head
    assert registry.get_loss_class("re_rank") is ReferringRankLoss
    assert registry.get_metric_class("refcoco_accuracy") is RefcocoAccuracy
