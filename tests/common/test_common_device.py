"""select_device and set_seed."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from villa_plugin.common import device as device_mod
from villa_plugin.common.device import MAX_SEED, select_device, set_seed
from villa_plugin.common.errors import ConfigError


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_auto_picks_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend 4 CUDA devices exist; record set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(index))
    return calls


def test_torchrun_ranks_get_their_local_device(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert select_device("auto") == torch.device("cuda", 2)
    assert select_device("cuda") == torch.device("cuda", 2)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    assert fake_cuda == [2, 2, 1]


def test_cuda_index_out_of_range(fake_cuda):
    with pytest.raises(ConfigError, match="has 4"):
        select_device("cuda:7")
    with pytest.raises(ConfigError, match="integer"):
        select_device("cuda:x")


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        select_device("cuda")
    assert select_device("auto") == torch.device("cpu")


def test_unknown_device_spec():
    with pytest.raises(ConfigError, match='training.device="gpu0"'):
        select_device("gpu0")


def test_set_seed_makes_python_numpy_torch_repeatable():
    assert set_seed(123) == 123
    first = _draws()
    set_seed(123)
    assert _draws() == first
    set_seed(124)
    assert _draws() != first


def test_random_seed_is_returned_and_reusable():
    seeds = {set_seed(-1) for _ in range(3)}
    assert all(0 <= s <= MAX_SEED for s in seeds) and len(seeds) > 1
    seed = set_seed(None)
    first = _draws()
    set_seed(seed)
    assert _draws() == first


@pytest.mark.parametrize("bad", [True, 1.5, "7", MAX_SEED + 1])
def test_invalid_seeds(bad):
    with pytest.raises(ConfigError, match="training.seed"):
        set_seed(bad)


def test_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert device_mod.local_rank() is None
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device_mod.local_rank() == 3
