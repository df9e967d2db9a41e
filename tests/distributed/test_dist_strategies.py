"""Strategy adapters without a process group: names, the optimizer spec, sharding units, errors,
and the checkpoint layout conversion of fsdp2."""
from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import villa_dist_helpers as h
from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.distributed import OptimizerSpec, as_optimizer_spec, build_strategy, resolve_strategy_name
from villa_plugin.distributed.base import SingleProcessStrategy, build_optimizer
from villa_plugin.distributed.fairscale_fsdp import FairscaleFSDPStrategy, gather_shard, shard_of
from villa_plugin.distributed.fairscale_sddp import import_fairscale
from villa_plugin.distributed.fsdp2 import fqn_to_index_layout, index_to_fqn_layout
from villa_plugin.distributed.sharding_units import transformer_layers
from villa_plugin.optim import AdamW


def _config(strategy="none", sharding=False):
    return OmegaConf.create({"distributed": {"strategy": strategy}, "optimizer": {"enable_state_sharding": sharding}})


def test_every_strategy_is_registered():
    from villa_plugin.registry import registry

    assert set(registry.names("strategy")) >= {"none", "ddp", "fairscale_sddp", "fairscale_fsdp", "zero", "fsdp2"}


@pytest.mark.parametrize("strategy", ["ddp", "fairscale_sddp"])
def test_enable_state_sharding_is_mmfs_alias_of_fairscale_sddp(monkeypatch, strategy):
    monkeypatch.setattr("villa_plugin.distributed._dist_ready", lambda: True)
    assert resolve_strategy_name(_config(strategy, sharding=True)) == "fairscale_sddp"
    assert resolve_strategy_name(_config(strategy, sharding=False)) == strategy


def test_enable_state_sharding_is_ignored_in_one_process():
    assert resolve_strategy_name(_config("none", sharding=True)) == "none"
    assert isinstance(build_strategy(_config("none", sharding=True)), SingleProcessStrategy)


@pytest.mark.parametrize("strategy", ["zero", "fsdp2", "fairscale_fsdp"])
def test_enable_state_sharding_conflicts_with_other_sharding(strategy):
    with pytest.raises(ConfigError, match="enable_state_sharding.*fairscale_sddp"):
        resolve_strategy_name(_config(strategy, sharding=True))


@pytest.mark.parametrize("name", ["ddp", "zero", "fairscale_sddp", "fsdp2"])
def test_distributed_strategies_need_a_process_group(name):
    with pytest.raises(ConfigError, match=f"distributed.strategy={name} needs a process group.*torchrun"):
        h.STRATEGY_CLASSES[name](_config(name), torch.device("cpu"))


def test_fairscale_fsdp_on_cpu_names_the_alternatives():
    with pytest.raises(ConfigError, match="fairscale_fsdp runs on CUDA only.*fsdp2.*fairscale_sddp"):
        FairscaleFSDPStrategy(_config("fairscale_fsdp"), torch.device("cpu"))


def test_missing_fairscale_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fairscale", None)
    with pytest.raises(ConfigError, match="needs fairscale.*pip install.*zero"):
        import_fairscale("fairscale_sddp")


@pytest.mark.parametrize("make", [h.make_sgd, h.make_adamw])
def test_optimizer_spec_rebuilds_the_same_optimizer(make):
    model = h.new_model()
    original = make(model.get_optimizer_parameters())
    spec = as_optimizer_spec(original)
    rebuilt = spec.build()
    assert type(rebuilt) is type(original)
    assert rebuilt.defaults == original.defaults
    assert [{k: v for k, v in g.items() if k != "params"} for g in rebuilt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in original.param_groups
    ]
    assert [[id(p) for p in g["params"]] for g in rebuilt.param_groups] == [[id(p) for p in g["params"]] for g in original.param_groups]


def test_make_optimizer_may_return_a_spec():
    model = h.new_model()
    strategy = SingleProcessStrategy(None)
    spec = OptimizerSpec(AdamW, model.get_optimizer_parameters(), {"lr": 0.1, "correct_bias": False})
    _, optimizer = strategy.wrap(model, lambda groups: spec)
    assert isinstance(optimizer, AdamW) and optimizer.defaults["correct_bias"] is False
    with pytest.raises(TypeError, match="Optimizer or an OptimizerSpec"):
        build_optimizer(object())


def test_single_process_strategy_checkpoint_methods():
    strategy, model, opt = h.build("none")
    h.run_updates(strategy, model, opt, h.make_updates(1)[:1])
    state = strategy.model_state_dict(model)
    fresh = h.new_model()
    strategy.load_model_state_dict(fresh, state)
    assert h.max_diff(dict(fresh.named_parameters()), dict(model.named_parameters())) == 0
    assert strategy.optimizer_state_dict(opt)["state"]
    assert strategy.grad_scaler("fp16") is None  # CPU: no scaler


def test_transformer_layers_are_found_generically():
    model = h.new_model()
    assert transformer_layers(model) == list(model.encoder.layer)
    assert transformer_layers(nn.Sequential(nn.Linear(2, 2))) == []

    class Block(nn.Module):
        pass

    class Other(nn.Module):
        pass

    holder = nn.Module()
    holder.blocks = nn.ModuleList([Block(), Other()])
    assert transformer_layers(holder) == [holder.blocks[0]]


def test_fsdp2_optimizer_layout_round_trip():
    model = h.new_model()
    opt = h.make_sgd(model.get_optimizer_parameters())
    h.run_updates(SingleProcessStrategy(None), model, opt, h.make_updates(1)[:1])
    indexed = opt.state_dict()
    keyed = index_to_fqn_layout(indexed, model, opt)
    names = [n for group in model.get_optimizer_parameters() for n, p in model.named_parameters() if any(p is q for q in group["params"])]
    assert [f for g in keyed["param_groups"] for f in g["params"]] == names
    back = fqn_to_index_layout(keyed)
    assert back["param_groups"] == indexed["param_groups"]
    assert back["state"].keys() == indexed["state"].keys()
    other = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="checkpoint.reset.optimizer"):
        index_to_fqn_layout(indexed, other, torch.optim.SGD(other.parameters(), lr=1.0))


def test_fairscale_fsdp_shard_round_trip_single_process_math():
    # The padded flat shards of fairscale FSDP, reassembled (gather is a collective: emulated).
    full = torch.arange(10.0).view(2, 5)
    param = nn.Parameter(torch.zeros(4))
    param._is_sharded, param._orig_size = True, full.shape
    shards = [shard_of(full, param, rank, 3) for rank in range(3)]
    assert [s.numel() for s in shards] == [4, 4, 4]
    assert torch.equal(torch.cat(shards)[:10].view(2, 5), full)
    assert shard_of(torch.tensor(3), param, 0, 3).item() == 3  # scalars (step) stay whole
    assert gather_shard(5, param, 3) == 5
