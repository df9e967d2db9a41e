"""One VILLA update on LXMERT: every parameter gradient equals the independent reference loop.

The reference (lxmert.md §9.2, villa-algorithm.md §3) runs the plain-torch forward of
lxmert_reference.py: clean logits kept attached, K = 3 steps of (task + α·SymKL)/K with the per-task
reductions of lxmert.md §9.3, δ ← δ + lr·g/‖g‖ per row, and one autograd.grad of the summed loss.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lxmert_reference import TINY, official_params, reference_logits
from lxmert_testlib import make_batch, make_model, relative_error, rows_per_example
from villa_plugin.adversarial import AdversarialConfig, FreeATEngine
from villa_plugin.backbones.lxmert.keys import canonical_key

MODALITIES = {"text": ["text"], "image": ["image"], "both": ["image", "text"]}
LR = {"text": 0.05, "image": 0.2}
ALPHA, K = 1.5, 3


def symkl(z, z_clean):
    """The official kl_div(log_softmax(z), p_c) + kl_div(log p_c, softmax(z)), elementwise."""
    return (F.kl_div(F.log_softmax(z, -1), F.softmax(z_clean, -1), reduction="none")
            + F.kl_div(F.log_softmax(z_clean, -1), F.softmax(z, -1), reduction="none"))


def task_and_kl(head, z, z_clean, targets):
    if head == "nlvr2":  # CE mean over B; F.kl_div default 'mean' over [B, 2], no factor
        return F.cross_entropy(z, targets, ignore_index=-1), symkl(z, z_clean).mean()
    answers = z.size(-1)  # BCE mean × A; KL element mean × A
    return F.binary_cross_entropy_with_logits(z, targets) * answers, symkl(z, z_clean).mean() * answers


def reference_grads(model, batch, head, active):
    P = official_params(model)
    shapes = model.perturbation_shapes(batch)
    ids, feats, boxes = batch["input_ids"], batch["img_feat"], batch["img_pos_feat"]

    def logits(deltas):
        return reference_logits(P, TINY, ids, ids != 0, feats, boxes, rows_per_example=rows_per_example(head),
                                txt_delta=deltas.get("text"), img_delta=deltas.get("image"))

    z_clean = logits({})
    deltas = {m: torch.zeros(shapes[m]) for m in active}
    total = 0.0
    for t in range(K):
        deltas = {m: d.detach().requires_grad_() for m, d in deltas.items()}
        task, kl = task_and_kl(head, logits(deltas), z_clean, batch["targets"])
        step = (task + ALPHA * kl) / K
        total = total + step
        if t < K - 1:
            grads = torch.autograd.grad(step, [deltas[m] for m in active], retain_graph=True)
            for m, g in zip(active, grads):
                norm = g.reshape(g.size(0), -1).norm(dim=1).clamp_min(1e-8).reshape(-1, 1, 1)
                deltas[m] = deltas[m].detach() + LR[m] * g / norm
    names = [n for n, p in P.items() if p.requires_grad]
    grads = torch.autograd.grad(total, [P[n] for n in names], allow_unused=True)
    return {canonical_key(n): g for n, g in zip(names, grads)}, deltas


@pytest.mark.parametrize("formulation", ["official", "exact"])
@pytest.mark.parametrize("modality", sorted(MODALITIES))
@pytest.mark.parametrize("head", ["vqa", "nlvr2"])
def test_villa_update_gradients_equal_the_reference(head, modality, formulation):
    active = [m for m in ("text", "image") if m in MODALITIES[modality]]
    model = make_model(head)
    batch = make_batch(head)
    expected, _ = reference_grads(model, batch, head, active)

    config = AdversarialConfig.from_dict(dict(
        adv_modality=MODALITIES[modality], adv_steps=K, adv_lr_txt=LR["text"], adv_lr_img=LR["image"],
        adv_kl_weight=ALPHA, formulation=formulation,
    ))
    stats = FreeATEngine(config).step(
        model, batch, backward=lambda loss, retain_graph=False: loss.backward(retain_graph=retain_graph),
        kl_reduction=model.kl_reduction,
    )
    for m in active:  # after 2 updates every row norm is at most 2·lr, and above 0
        assert 0 < stats[f"delta_norm_{m}"] <= 2 * LR[m] + 1e-6

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(expected)
    for name, param in trainable.items():
        assert param.grad is not None, name
        ref = expected[name] if expected[name] is not None else torch.zeros_like(param)
        if name.endswith("key.bias"):  # mathematically zero: round-off only
            assert (param.grad - ref).abs().max() <= 1e-6, name
        else:
            assert relative_error(param.grad, ref) <= 1e-5, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_every_trainable_parameter_gets_a_gradient():
    """DDP/ZeRO without find_unused_parameters: only the frozen dead visual half gets no gradient."""
    model = make_model("vqa", dropout=0.1)
    output = model(make_batch("vqa"))
    sum(output["losses"].values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert len(frozen) == 16 and all(n.startswith("lxmert.encoder.x_layers.1.visn_") for n in frozen)
    emb = model.lxmert.embeddings  # padding_idx=0 rows: exactly zero, as in the reference
    assert emb.position_embeddings.weight.grad[0].abs().max() == 0
    assert emb.token_type_embeddings.weight.grad[0].abs().max() == 0
    assert emb.word_embeddings.weight.grad[0].abs().max() == 0


def test_text_delta_gradient_is_zero_at_padding():
    model = make_model("vqa")
    batch = make_batch("vqa")
    delta = torch.zeros(model.perturbation_shapes(batch)["text"], requires_grad=True)
    sum(model(batch, perturbation={"text": delta})["losses"].values()).backward()
    pad = batch["input_ids"] == 0
    assert pad.any() and delta.grad[pad].abs().max() == 0 and delta.grad[~pad].abs().max() > 0
