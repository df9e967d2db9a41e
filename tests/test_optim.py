"""HF AdamW, parameter groups and learning-rate schedules."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.optim import (
    AdamW,
    Constant,
    WarmupCosine,
    WarmupLinear,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    optimizer_class,
)
from villa_plugin.registry import RegistryError


def _hand_adamw(p, grads, lr, b1, b2, eps, wd):
    """Element-wise HF AdamW in plain Python floats."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - step * m / (math.sqrt(v) + eps)
        p = p - lr * wd * p
    return p


def test_adamw_matches_the_hand_computation_over_two_steps():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.98, 0.05, 0.2  # large eps/wd make the HF details visible
    start = [0.5, -1.0, 2.0]
    grads = [[0.3, -0.2, 1.0], [-0.1, 0.4, 0.5]]
    param = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = AdamW([param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    expected = [_hand_adamw(start[i], [g[i] for g in grads], lr, b1, b2, eps, wd) for i in range(3)]
    assert param.detach().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)

    torch_param = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    torch_opt = torch.optim.AdamW([torch_param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for g in grads:
        torch_param.grad = torch.tensor(g, dtype=torch.float64)
        torch_opt.step()
    assert not torch.allclose(torch_param, param, atol=1e-4)  # torch's variant differs


def test_adamw_foreach_update_is_the_loop_update_bit_for_bit():
    """The multi-tensor path (default on CUDA) runs the loop's arithmetic: same params and states,
    exactly, over steps where one parameter sometimes has no gradient (its step count lags)."""
    torch.manual_seed(0)
    shapes = [(5, 3), (3,), (7,)]
    runs = {}
    for foreach in (False, True):
        params = [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
        groups = [{"params": params[:2], "weight_decay": 0.01}, {"params": params[2:], "weight_decay": 0.0}]
        optimizer = AdamW(groups, lr=0.05, betas=(0.9, 0.98), eps=1e-6, foreach=foreach)
        for step in range(4):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
                p.grad = None if (i == 1 and step == 1) else g
            optimizer.step()
        runs[foreach] = (params, optimizer)
    (loop_params, loop_opt), (multi_params, multi_opt) = runs[False], runs[True]
    for a, b in zip(loop_params, multi_params):
        assert torch.equal(a, b)
        sa, sb = loop_opt.state[a], multi_opt.state[b]
        assert sa["step"] == sb["step"] and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert multi_opt.state[multi_params[1]]["step"] == 3
    assert "foreach" not in multi_opt.state_dict()["param_groups"][0]  # saved states keep their keys


def test_adamw_skips_params_without_grad_and_state_is_plain():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = AdamW([a, b], lr=0.1)
    a.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(b.detach(), torch.ones(2)) and not torch.equal(a.detach(), torch.ones(2))
    assert optimizer.state_dict()["state"][0]["step"] == 1


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.LayerNorm = nn.LayerNorm(2)
        self.img_layer_norm = nn.LayerNorm(2)
        self.vqa_output = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        self.vqa_output_extra = nn.Linear(2, 1)  # shares the prefix text, not the module
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _names(model, group):
    lookup = {id(p): n for n, p in model.named_parameters()}
    return sorted(lookup[id(p)] for p in group["params"])


def test_param_groups_no_decay_substring_rule_and_lr_mult():
    model = _Net()
    config = OmegaConf.create({"params": {"weight_decay": 0.01}, "no_decay": ["bias", "LayerNorm.bias", "LayerNorm.weight"], "lr_multipliers": {"vqa_output": 10}})
    groups = build_param_groups(model, config)
    assert [(g["lr_mult"], g["weight_decay"]) for g in groups] == [(10.0, 0.01), (10.0, 0.0), (1.0, 0.01), (1.0, 0.0)]
    # as the reference: the head's own LayerNorm (vqa_output.1.weight) and img_layer_norm.weight ARE decayed
    assert _names(model, groups[0]) == ["vqa_output.0.weight", "vqa_output.1.weight"]
    assert _names(model, groups[1]) == ["vqa_output.0.bias", "vqa_output.1.bias"]
    assert _names(model, groups[2]) == ["encoder.weight", "img_layer_norm.weight", "vqa_output_extra.weight"]
    assert _names(model, groups[3]) == ["LayerNorm.bias", "LayerNorm.weight", "encoder.bias", "img_layer_norm.bias", "vqa_output_extra.bias"]


def test_unknown_lr_multiplier_prefix_is_a_config_error():
    with pytest.raises(ConfigError, match="vqa_head"):
        build_param_groups(_Net(), {"lr_multipliers": {"vqa_head": 10}})


def test_optimizer_names_registry_alias_and_torch():
    assert optimizer_class("adamw_hf") is AdamW and optimizer_class("adam_w") is AdamW
    assert optimizer_class("SGD") is torch.optim.SGD
    with pytest.raises(RegistryError, match="torch.optim"):
        optimizer_class("adamw_typo")
    opt = build_optimizer(nn.Linear(2, 2).parameters(), OmegaConf.create({"type": "SGD", "params": {"lr": 0.1, "betas": [0.9, 0.98]}}))
    assert isinstance(opt, torch.optim.SGD)  # AdamW-only keys merged from the defaults are dropped


def _optimizer(mults=(1.0,)):
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr_mult": m} for m in mults], lr=99.0)


def test_warmup_linear_exactly_as_the_reference():
    base, warmup, total = 1e-4, 4, 10
    optimizer = _optimizer((1.0, 10.0))
    schedule = WarmupLinear(optimizer, base_lr=base, warmup_steps=warmup, num_training_steps=total)
    seen = [schedule.get_last_lr()]
    for _ in range(total):
        schedule.step()
        seen.append(schedule.get_last_lr())
    assert seen[0] == pytest.approx([base / warmup, 10 * base / warmup])  # update 1: base/warmup, not 0
    assert seen[warmup - 1][0] == pytest.approx(base)  # update `warmup`: (T-w)/(T-w) = 1
    assert seen[warmup][0] == pytest.approx(base * (total - 5) / (total - warmup))
    assert seen[total - 1] == pytest.approx([1e-8, 1e-7])  # update T: 0 -> 1e-8 (before lr_mult)
    assert schedule.lr_at(2) == pytest.approx(base * 2 / warmup)


def test_schedule_state_is_plain_and_restores_the_lr():
    optimizer = _optimizer()
    schedule = WarmupLinear(optimizer, base_lr=1.0, warmup_steps=2, num_training_steps=6)
    for _ in range(3):
        schedule.step()
    state = schedule.state_dict()
    assert state == {"last_step": 3, "base_lr": 1.0}
    fresh = WarmupLinear(_optimizer(), base_lr=1.0, warmup_steps=2, num_training_steps=6)
    fresh.load_state_dict(state)
    assert fresh.get_last_lr() == schedule.get_last_lr() == [pytest.approx(0.5)]


def test_cosine_and_constant_schedules():
    cosine = WarmupCosine(_optimizer(), base_lr=1.0, warmup_steps=2, num_training_steps=6)
    assert [cosine.lr_at(s) for s in (1, 2, 4, 6)] == pytest.approx([0.5, 1.0, 0.5, 1e-8])
    constant = Constant(_optimizer(), base_lr=2.0, warmup_steps=2, num_training_steps=None)
    assert [constant.lr_at(s) for s in (1, 2, 100)] == pytest.approx([1.0, 2.0, 2.0])


def test_build_scheduler_from_config_and_missing_total():
    config = OmegaConf.create({
        "optimizer": {"params": {"lr": 0.2}},
        "scheduler": {"type": "warmup_linear", "params": {"warmup_steps": 2, "num_training_steps": None}},
    })
    schedule = build_scheduler(_optimizer(), config, num_training_steps=8)
    assert isinstance(schedule, WarmupLinear) and schedule.num_training_steps == 8
    assert schedule.get_last_lr() == [pytest.approx(0.1)]
    with pytest.raises(ConfigError, match="num_training_steps"):
        build_scheduler(_optimizer(), config)
