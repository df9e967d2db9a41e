"""Optimizer and model state saved under a sharding strategy (world 2) is the single-process
layout: it resumes under strategy none (world 1) with the same next update, and a single-process
checkpoint resumes under every strategy."""
from __future__ import annotations

import os

import pytest
import torch

import villa_dist_helpers as h
from conftest import STRATEGIES

TOL = 1e-6


def _resume_single_process(path):
    state = torch.load(path, weights_only=True)  # (the optimizer will share and update its tensors)
    strategy, model, opt = h.build("none")
    strategy.load_model_state_dict(model, state["model"])
    strategy.load_optimizer_state_dict(opt, state["optimizer"])
    return h.run_updates(strategy, model, opt, h.make_updates(1)[2:])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distributed_checkpoint_resumes_in_one_process(matrix, references, strategy):
    case = f"{strategy}-ckpt_save"
    path = os.path.join(matrix["workdir"], f"ckpt_{case}.pt")
    state = torch.load(path, weights_only=True)
    resumed = _resume_single_process(path)
    uninterrupted = matrix["ranks"][0][case]["params"]
    assert h.max_diff(resumed["params"][0], uninterrupted[2]) <= TOL
    assert h.max_diff(resumed["params"][0], references()["params"][2]) <= TOL
    # The single-process layout: integer ids in group order, full-shape momentum buffers.
    reference_state = torch.load(os.path.join(matrix["workdir"], "ckpt_single.pt"), weights_only=True)["optimizer"]
    assert [g["params"] for g in state["optimizer"]["param_groups"]] == [g["params"] for g in reference_state["param_groups"]]
    assert sorted(state["optimizer"]["state"]) == sorted(reference_state["state"])
    for index, value in reference_state["state"].items():
        torch.testing.assert_close(state["optimizer"]["state"][index]["momentum_buffer"], value["momentum_buffer"], rtol=0, atol=TOL)
    assert sorted(state["model"]) == sorted(h.new_model().state_dict())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_process_checkpoint_resumes_distributed(matrix, references, strategy):
    expected = references()["params"][2]
    for rank_results in matrix["ranks"]:
        assert h.max_diff(rank_results[f"{strategy}-ckpt_load"]["params"][0], expected) <= TOL
