"""The free-AT engine against a by-hand autograd reference and VILLA's invariants."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from adv_tiny_model import TinyVLModel, make_batch, make_model
from villa_plugin.adversarial import AdversarialConfig, FreeATEngine
from villa_plugin.common.errors import TrainingError

ACTIVE = {
    ("text",): ["text"],
    ("image",): ["image"],
    ("image", "text"): ["text", "image"],
    ("text", "image", "alter"): ["text", "image"],
}


def cfg(**kw) -> AdversarialConfig:
    base = dict(adv_modality=["text"], adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.05, adv_kl_weight=1.5)
    base.update(kw)
    return AdversarialConfig.from_dict(base)


def plain_backward(loss, retain_graph=False):
    loss.backward(retain_graph=retain_graph)


def run_engine(config, dropout=0.0, seed=0, batch=None, backward=plain_backward, **kw):
    model = make_model(dropout=dropout)
    batch = batch if batch is not None else make_batch()
    torch.manual_seed(seed)
    stats = FreeATEngine(config).step(model, batch, backward=backward, **kw)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, stats, grads


def symkl_by_hand(z, z_clean):
    """The official form kl_div(log_softmax(z), p_c) + kl_div(log p_c, softmax(z)), elementwise."""
    z, z_clean = z.float(), z_clean.float()
    return F.kl_div(F.log_softmax(z, -1), F.softmax(z_clean, -1), reduction="none") + F.kl_div(
        F.log_softmax(z_clean, -1), F.softmax(z, -1), reduction="none"
    )


def hand_reference(config, dropout=0.0, seed=0):
    """(1/K) Σ_t ∇θ[task_t + α·KLRED_t] with δ_{t+1} = δ_t + lr·g/‖g‖ computed with autograd.grad."""
    model = make_model(dropout=dropout)
    batch = make_batch()
    torch.manual_seed(seed)
    params = [p for p in model.parameters()]
    active = ACTIVE[config.adv_modality]
    shapes = model.perturbation_shapes(batch)
    z_clean = model(batch)["scores"]
    deltas = {m: torch.zeros(shapes[m]) for m in active}
    total, history = 0.0, []
    K = config.adv_steps
    for t in range(K):
        for m in active:
            deltas[m] = deltas[m].detach().requires_grad_()
        history.append({m: d.detach().clone() for m, d in deltas.items()})
        if config.alter:
            perts = [{"text": deltas["text"], "image": None}, {"text": None, "image": deltas["image"]}]
        else:
            perts = [{"text": deltas.get("text"), "image": deltas.get("image")}]
        step_loss = 0.0
        for pert in perts:
            out = model(batch, perturbation=pert)
            task = sum(out["losses"].values())
            kl = symkl_by_hand(out["scores"], z_clean).sum(-1).mean()  # mean_times_classes
            step_loss = step_loss + task + config.adv_kl_weight * kl
        step_loss = step_loss / (K * len(perts))
        total = total + step_loss
        if t < K - 1:
            grads = torch.autograd.grad(step_loss, [deltas[m] for m in active], retain_graph=True)
            for m, g in zip(active, grads):
                norm = g.reshape(g.size(0), -1).norm(dim=1).clamp_min(1e-8).reshape(-1, 1, 1)
                deltas[m] = deltas[m].detach() + config.lr_for(m) * g / norm
    param_grads = torch.autograd.grad(total, params, allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    return {n: g for n, g in zip(names, param_grads) if g is not None}, history


def perturbed_calls(model):
    return [c for c in model.calls if c is not None]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- the ascent step moves along +∇δ ----------------------------------------------------------
@pytest.mark.parametrize("modality", [["text"], ["image"]])
def test_first_ascent_step_has_norm_lr_and_follows_the_gradient(modality):
    lr = 0.05
    model, _, _ = run_engine(cfg(adv_modality=modality, adv_steps=2, adv_lr_txt=lr, adv_lr_img=lr))
    m = modality[0]
    step0, step1 = perturbed_calls(model)
    g0 = step0[m].grad.reshape(step0[m].size(0), -1)
    d1 = step1[m].detach().reshape(g0.shape)
    torch.testing.assert_close(d1.norm(dim=1), torch.full((g0.size(0),), lr), rtol=0, atol=1e-7)
    torch.testing.assert_close(F.cosine_similarity(d1, g0, dim=1), torch.ones(g0.size(0)), rtol=0, atol=1e-6)


def test_small_step_increases_the_adversarial_loss():
    config = cfg(adv_steps=2, adv_lr_txt=1e-3)
    model, _, _ = run_engine(config)
    delta1 = perturbed_calls(model)[1]["text"].detach()
    batch = make_batch()
    with torch.no_grad():
        clean = model(batch)["scores"]

        def adv_loss(delta):
            out = model(batch, perturbation={"text": delta, "image": None})
            kl = symkl_by_hand(out["scores"], clean).sum(-1).mean()
            return sum(out["losses"].values()) + config.adv_kl_weight * kl

        assert adv_loss(delta1) > adv_loss(torch.zeros_like(delta1))


def test_two_updates_keep_row_norms_within_two_lr():
    lr = 0.05
    model, stats, _ = run_engine(cfg(adv_modality=["image", "text"], adv_lr_txt=lr, adv_lr_img=lr * 2))
    last = perturbed_calls(model)[-1]
    for m, bound in (("text", 2 * lr), ("image", 4 * lr)):
        norms = last[m].detach().reshape(last[m].size(0), -1).norm(dim=1)
        assert (norms <= bound + 1e-6).all()
        assert (norms > 0).all()
        torch.testing.assert_close(stats[f"delta_norm_{m}"], norms.mean())


def test_linf_step_is_gradient_over_its_max_not_sign():
    lr = 0.01
    model, _, _ = run_engine(cfg(adv_steps=2, norm_type="linf", adv_lr_txt=lr))
    step0, step1 = perturbed_calls(model)
    g0 = step0["text"].grad
    expected = lr * g0 / g0.abs().amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(step1["text"].detach(), expected, rtol=0, atol=1e-9)
    assert not torch.allclose(step1["text"].detach(), lr * g0.sign())


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_projection_bounds_the_delta(norm_type):
    model, _, _ = run_engine(cfg(adv_lr_txt=0.5, adv_max_norm=0.3, norm_type=norm_type))
    last = perturbed_calls(model)[-1]["text"].detach()
    if norm_type == "l2":
        norms = last.reshape(last.size(0), -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.3))  # 2 steps of 0.5 exceed 0.3
    else:
        assert last.abs().max() <= 0.3 + 1e-7
        assert torch.isclose(last.abs().max(), torch.tensor(0.3))


# -- the parameter gradient equals the algorithm by hand ----------------------------------------
@pytest.mark.parametrize("modality", [["text"], ["image"], ["image", "text"], ["text", "image", "alter"]])
@pytest.mark.parametrize("formulation", ["exact", "official"])
def test_parameter_grad_matches_hand_computation(modality, formulation):
    config = cfg(adv_modality=modality, formulation=formulation, adv_lr_txt=0.3, adv_lr_img=0.7)
    model, _, grads = run_engine(config)
    expected, history = hand_reference(config)
    assert max_diff(grads, expected) < 1e-6
    calls = perturbed_calls(model)
    per_step = 2 if config.alter else 1
    for t in range(config.adv_steps):
        seen = {m: d for call in calls[t * per_step : (t + 1) * per_step] for m, d in call.items() if d is not None}
        assert seen.keys() == history[t].keys()
        for m, delta in history[t].items():
            torch.testing.assert_close(seen[m].detach(), delta, rtol=0, atol=1e-6)


def test_first_step_kl_is_exactly_zero_and_adds_no_gradient():
    config = cfg(adv_steps=1)
    _, stats, with_kl = run_engine(config)
    assert stats["kl"].item() == 0.0
    _, _, without_kl = run_engine(cfg(adv_steps=1, adv_kl_weight=0.0))
    assert max_diff(with_kl, without_kl) == 0.0


def test_dropout_makes_kl_nonzero_at_zero_lr():
    _, stats, _ = run_engine(cfg(adv_lr_txt=0.0), dropout=0.3)
    assert stats["kl"].item() > 1e-6


# -- formulations -------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", [["text"], ["image"], ["image", "text"], ["text", "image", "alter"]])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_exact_equals_official(modality, dropout):
    common = dict(adv_modality=modality, adv_lr_txt=0.3, adv_lr_img=0.3)
    _, s_off, official = run_engine(cfg(formulation="official", **common), dropout=dropout, seed=3)
    _, s_ex, exact = run_engine(cfg(formulation="exact", **common), dropout=dropout, seed=3)
    assert max_diff(official, exact) < 1e-7
    for key in s_off:
        torch.testing.assert_close(s_off[key], s_ex[key], rtol=1e-6, atol=1e-7)


def test_kl_detach_clean_differs():
    common = dict(adv_lr_txt=0.3, adv_kl_weight=3.0)
    _, _, exact = run_engine(cfg(**common), dropout=0.2, seed=3)
    _, _, detached = run_engine(cfg(kl_detach_clean=True, **common), dropout=0.2, seed=3)
    assert max_diff(exact, detached) > 1e-4


@pytest.mark.parametrize("formulation", ["exact", "official"])
def test_alter_divides_by_two_k(formulation):
    # lr 0, α 0, no dropout: every forward equals the clean one, so the average is ∇task(clean).
    config = cfg(adv_modality=["text", "image", "alter"], adv_lr_txt=0.0, adv_lr_img=0.0, adv_kl_weight=0.0, formulation=formulation)
    model, _, grads = run_engine(config)
    assert len(perturbed_calls(model)) == 2 * config.adv_steps
    reference = make_model()
    sum(reference(make_batch())["losses"].values()).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert max_diff(grads, expected) < 1e-6


@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_exact_is_exact_under_a_scaling_backward(scale):
    """A GradScaler-style backward (loss × s) gives s × the unscaled gradients."""
    common = dict(adv_modality=["image", "text"], adv_lr_txt=0.3, adv_lr_img=0.3)
    _, _, reference = run_engine(cfg(formulation="official", **common))

    def scaled_backward(loss, retain_graph=False):
        (loss * scale).backward(retain_graph=retain_graph)

    _, _, scaled = run_engine(cfg(formulation="exact", **common), backward=scaled_backward)
    assert max_diff({k: v / scale for k, v in scaled.items()}, reference) < 1e-6


# -- modalities -----------------------------------------------------------------------------------
@pytest.mark.parametrize("modality,inactive", [(["text"], "image"), (["image"], "text")])
def test_single_modality_never_touches_the_other_delta(modality, inactive):
    model, stats, _ = run_engine(cfg(adv_modality=modality))
    calls = perturbed_calls(model)
    assert len(calls) == 3
    assert all(call[inactive] is None for call in calls)
    assert all(call[modality[0]] is not None for call in calls)
    assert f"delta_norm_{inactive}" not in stats


def test_alter_perturbs_one_modality_per_forward():
    model, _, _ = run_engine(cfg(adv_modality=["alter", "image", "text"]))
    calls = perturbed_calls(model)
    assert [(c["text"] is not None, c["image"] is not None) for c in calls] == [(True, False), (False, True)] * 3


# -- non-finite gradients --------------------------------------------------------------------------
def test_nan_delta_gradient_skips_the_update_and_is_counted():
    model = make_model()
    model.nan_grad_modality = "text"
    config = cfg(adv_modality=["image", "text"])
    stats = FreeATEngine(config).step(model, make_batch(), backward=plain_backward)
    calls = perturbed_calls(model)
    assert stats["ascent_skips"].item() == 2  # K−1 text updates skipped
    assert all((c["text"].detach() == 0).all() for c in calls)
    assert (calls[-1]["image"].detach() != 0).any()  # the image update still happened
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- call structure, sync and plain path -----------------------------------------------------------
class Recorder:
    def __init__(self, model):
        self.events = []
        original = model.forward

        def forward(batch, perturbation=None):
            self.events.append("fwd_clean" if perturbation is None else "fwd")
            return original(batch, perturbation)

        model.forward = forward

    def backward(self, loss, retain_graph=False):
        self.events.append(f"bwd(retain={retain_graph})")
        loss.backward(retain_graph=retain_graph)

    def sync_context(self, is_last):
        @contextlib.contextmanager
        def ctx():
            self.events.append(f"enter({is_last})")
            yield
            self.events.append("exit")

        return ctx()


@pytest.mark.parametrize("formulation", ["exact", "official"])
@pytest.mark.parametrize("is_last", [True, False])
def test_sync_context_wraps_clean_and_first_steps_then_last_step(formulation, is_last):
    model = make_model()
    rec = Recorder(model)
    FreeATEngine(cfg(formulation=formulation)).step(
        model, make_batch(), backward=rec.backward, sync_context=rec.sync_context, is_last_micro_batch=is_last
    )
    retain = formulation == "official"
    assert rec.events == [
        "enter(False)", "fwd_clean",
        "fwd", f"bwd(retain={retain})",
        "fwd", f"bwd(retain={retain})",
        "exit", f"enter({is_last})",
        "fwd", "bwd(retain=False)",
        "exit",
    ]  # fmt: skip


def test_adv_training_false_is_one_plain_forward_backward(monkeypatch):
    batch = make_batch()
    model = make_model(dropout=0.2)
    rec = Recorder(model)
    torch.manual_seed(5)
    stats = FreeATEngine(cfg(adv_training=False)).step(
        model, batch, backward=rec.backward, sync_context=rec.sync_context, is_last_micro_batch=False
    )
    assert rec.events == ["enter(False)", "fwd_clean", "bwd(retain=False)", "exit"]
    reference = make_model(dropout=0.2)
    torch.manual_seed(5)
    loss = sum(reference(batch)["losses"].values())
    loss.backward()
    assert torch.equal(stats["task_loss"], loss.detach())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("adv_training", [True, False])
def test_no_host_sync_inside_the_step(monkeypatch, adv_training):
    def forbidden(self):
        raise AssertionError(".item() called inside the engine step")

    model, batch = make_model(dropout=0.1), make_batch()
    engine = FreeATEngine(cfg(adv_training=adv_training, adv_modality=["image", "text"]))
    engine.step(model, batch, backward=plain_backward)  # the first step checks δ's gradients once
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    stats = engine.step(model, batch, backward=plain_backward)
    monkeypatch.undo()
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_random_init_is_bounded_and_masked():
    mag = 0.2
    model, _, _ = run_engine(cfg(adv_init_mag=mag, adv_steps=1))
    delta = perturbed_calls(model)[0]["text"].detach()
    assert delta.abs().sum() > 0
    assert (delta.reshape(delta.size(0), -1).norm(dim=1) <= mag).all()
    padded = make_batch()["input_ids"] == 0
    assert (delta[padded] == 0).all()


def test_bf16_autocast_keeps_fp32_deltas():
    model = make_model()
    stats = FreeATEngine(cfg(adv_modality=["image", "text"])).step(
        model, make_batch(), backward=plain_backward, forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert all(c[m].dtype == torch.float32 for c in perturbed_calls(model) for m in ("text", "image"))
    assert stats["delta_norm_text"] > 0


def test_missing_losses_is_a_clear_error():
    model = make_model()
    batch = make_batch()
    del batch["targets"]
    with pytest.raises(ValueError, match="no 'losses'"):
        FreeATEngine(cfg()).step(model, batch, backward=plain_backward)


# -- a perturbation that cannot move, a clean gradient that went missing ------------------------
class _IgnoresImage(TinyVLModel):
    """Accepts ``perturbation`` but drops the image δ (the silent no-adversary run)."""

    def forward(self, batch, perturbation=None):
        return super().forward(batch, {**(perturbation or {}), "image": None} if perturbation else None)


class _ScalesTextToZero(TinyVLModel):
    """Adds ``0 · δ_text``: δ is in the graph but its gradient is identically zero."""

    def forward(self, batch, perturbation=None):
        if perturbation and perturbation.get("text") is not None:
            perturbation = {**perturbation, "text": perturbation["text"] * 0.0}
        return super().forward(batch, perturbation)


class _DetachesText(TinyVLModel):
    """Adds the text δ detached: it reaches the logits but no gradient reaches δ."""

    def forward(self, batch, perturbation=None):
        if perturbation and perturbation.get("text") is not None:
            perturbation = {**perturbation, "text": perturbation["text"].detach()}
        return super().forward(batch, perturbation)


@pytest.mark.parametrize(
    "model_cls, modality, why",
    [(_IgnoresImage, "image", "missing"), (_ScalesTextToZero, "text", "identically zero"), (_DetachesText, "text", "missing")],
)
def test_a_delta_the_model_ignores_is_an_error_naming_the_modality(model_cls, modality, why):
    model = model_cls({"dropout": 0.1})
    model.build()
    model.init_losses()
    with pytest.raises(TrainingError, match=rf"cannot perturb \['{modality}'\].*δ_{modality} is {why}"):
        FreeATEngine(cfg(adv_modality=["image", "text"])).step(model, make_batch(), backward=plain_backward)


def test_the_delta_gradient_check_runs_on_the_first_step_only():
    # checked on the engine's first micro-batch; later ones are not (no host sync in steady state)
    engine = FreeATEngine(cfg(adv_modality=["image", "text"]))
    engine.step(make_model(), make_batch(), backward=plain_backward)
    model = _IgnoresImage({"dropout": 0.0})
    model.build()
    model.init_losses()
    stats = engine.step(model, make_batch(), backward=plain_backward)
    assert stats["delta_norm_image"].item() == 0.0


def params_and_deltas_only(model):
    """A backward that restricts its inputs: the clean leaf and the scale probe get no ``.grad``."""

    def backward(loss, retain_graph=False):
        deltas = [d for d in model.calls[-1].values() if d is not None]
        torch.autograd.backward(loss, inputs=list(model.parameters()) + deltas, retain_graph=retain_graph)

    return backward


def test_exact_without_a_clean_leaf_gradient_is_an_error():
    model = make_model()
    with pytest.raises(TrainingError, match="formulation=exact: the clean-logits leaf got no gradient"):
        FreeATEngine(cfg(formulation="exact")).step(model, make_batch(), backward=params_and_deltas_only(model))
    # the official formulation has no such leaf and trains with the same backward
    model = make_model()
    FreeATEngine(cfg(formulation="official")).step(model, make_batch(), backward=params_and_deltas_only(model))
    assert all(p.grad is not None for p in model.parameters())


# -- what the adversary changes: kl_gain and delta_ratio ---------------------------------------
def test_kl_gain_is_the_later_steps_kl_over_step_zeros():
    _, stats, _ = run_engine(cfg(adv_steps=3), dropout=0.0)  # step 0: δ_0 = 0, no dropout: KL exactly 0
    assert stats["kl_gain"].item() == pytest.approx(stats["kl"].item() * 3 / 2, rel=1e-5)
    assert stats["kl_gain"].item() > 0
    _, still, _ = run_engine(cfg(adv_lr_txt=0.0), dropout=0.0)  # no ascent, no dropout: nothing gained
    assert still["kl_gain"].item() == 0.0
    _, single, _ = run_engine(cfg(adv_steps=1))
    assert "kl_gain" not in single  # K = 1: no ascent step to measure


class _ReportsInputNorms(TinyVLModel):
    def forward(self, batch, perturbation=None):
        output = super().forward(batch, perturbation)
        if perturbation:
            output["perturbed_input_norms"] = {"image": batch["img_feat"].flatten(1).norm(dim=1)}
        return output


def test_delta_ratio_is_reported_when_the_model_gives_input_norms():
    batch = make_batch()
    torch.manual_seed(0)
    model = _ReportsInputNorms({"dropout": 0.0})
    model.build()
    model.init_losses()
    stats = FreeATEngine(cfg(adv_modality=["image", "text"])).step(model, batch, backward=plain_backward)
    expected = stats["delta_norm_image"] / batch["img_feat"].flatten(1).norm(dim=1).mean()
    assert stats["delta_ratio_image"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "delta_ratio_text" not in stats  # the model reported no text norm
