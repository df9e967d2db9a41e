"""What of ``fairscale_fsdp`` runs without a GPU: the wrapping plan (which modules become FSDP
units, with which arguments), the precision settings, the optimizer groups and ``unwrap``.
fairscale's FSDP itself asserts CUDA, so it is replaced by a recording stand-in here; sharding,
no_sync, clipping and the optimizer-state gather need a GPU (tests/distributed/test_dist_cuda.py)."""
from __future__ import annotations

import pytest
import torch
from fairscale.nn import data_parallel as fairscale_dp  # the "test" extra installs fairscale
from omegaconf import OmegaConf
from torch import nn

import villa_dist_helpers as h
from villa_plugin.distributed import fairscale_fsdp
from villa_plugin.distributed.base import Strategy
from villa_plugin.distributed.fairscale_fsdp import FairscaleFSDPStrategy, _replace_child



class RecordingFSDP(nn.Module):
    """Stands in for fairscale's FullyShardedDataParallel: keeps the module and the arguments."""

    def __init__(self, module, **kwargs):
        super().__init__()
        self.module, self.kwargs = module, kwargs

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _strategy(precision="fp32", reshard=True, world_size=1):
    """The strategy built past its CUDA check (the rest of construction is plain attributes)."""
    config = OmegaConf.create({
        "training": {"precision": precision},
        "distributed": {"strategy": "fairscale_fsdp", "fsdp_reshard_after_forward": reshard},
        "optimizer": {"no_decay": ["bias", "LayerNorm.weight", "LayerNorm.bias"], "lr_multipliers": {}},
    })
    cls = type("CpuFairscaleFSDP", (FairscaleFSDPStrategy,), {"world_size": world_size})
    strategy = cls.__new__(cls)
    Strategy.__init__(strategy, config, torch.device("cpu"))
    return strategy


@pytest.mark.parametrize("precision, world_size, expected", [
    ("fp32", 1, {}),
    ("bf16", 1, {}),  # world size 1: fp32 parameters + autocast (fairscale frees low-precision copies in no_sync)
    ("bf16", 2, {"mixed_precision": True, "fp32_reduce_scatter": True, "compute_dtype": torch.bfloat16}),
    ("fp16", 4, {"mixed_precision": True, "fp32_reduce_scatter": True, "compute_dtype": torch.float16}),
])
def test_precision_and_resharding_become_fsdp_arguments(precision, world_size, expected):
    kwargs = _strategy(precision, reshard=False, world_size=world_size)._fsdp_kwargs()
    assert kwargs == {"flatten_parameters": False, "compute_device": torch.device("cpu"), "reshard_after_forward": False, **expected}


def test_wrap_makes_every_transformer_layer_a_unit_then_the_root(monkeypatch):
    monkeypatch.setattr(fairscale_dp, "FullyShardedDataParallel", RecordingFSDP)
    monkeypatch.setattr(fairscale_fsdp, "broadcast_module", lambda model: None)  # no process group here
    model = h.new_model()
    layers = list(model.encoder.layer)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []

    def make_optimizer(groups):
        seen.extend(groups)
        return torch.optim.SGD(groups, lr=0.1)

    strategy = _strategy(reshard=True)
    wrapped, optimizer = strategy.wrap(model, make_optimizer)
    assert isinstance(wrapped, RecordingFSDP) and wrapped.module is model
    assert [type(unit) for unit in model.encoder.layer] == [RecordingFSDP] * len(layers)
    assert [unit.module for unit in model.encoder.layer] == layers
    assert all(unit.kwargs == strategy._fsdp_kwargs() for unit in [wrapped, *model.encoder.layer])
    # groups are built from the bare model's names: the no-decay rule still sees "bias"/"LayerNorm"
    no_decay = [names[id(p)] for g in seen if g["weight_decay"] == 0.0 for p in g["params"]]
    assert no_decay and all("bias" in n or "LayerNorm" in n for n in no_decay)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    assert strategy.unwrap(wrapped) is model


def test_replacing_a_module_that_is_not_in_the_model_fails():
    with pytest.raises(ValueError, match="sharding unit not found"):
        _replace_child(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2), nn.Identity())

