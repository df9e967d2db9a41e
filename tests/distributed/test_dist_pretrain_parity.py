"""A pre-training step per task (MLM, MRFR with its MSE consistency, MRC-kl, ITM + WRA; adversarial,
exact formulation) under ddp and fsdp2 on 2 CPU/gloo ranks equals the single process (<= 1e-6)."""
from __future__ import annotations

import os

import pytest
import torch

import pretrain_dist_helpers as p
import villa_dist_helpers as h

TOL = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain_dist"))
    h.spawn(p.worker, (p.WORLD, workdir), timeout_s=300)
    return [torch.load(os.path.join(workdir, f"pretrain_rank{r}.pt"), weights_only=True) for r in range(p.WORLD)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_pretraining_step_per_task_matches_single_process(ranks, strategy):
    reference = p.run("none")
    initial = {k: v.detach().clone() for k, v in p.new_model().named_parameters()}
    assert h.max_diff(reference[-1], initial) > 1e-3, "the updates must move the parameters"
    for rank_results in ranks:
        for task, got, expected in zip(p.TASKS, rank_results[strategy], reference):
            worst = max(got, key=lambda k: float((got[k].double() - expected[k].double()).abs().max()))
            assert h.max_diff(got, expected) <= TOL, (task, worst)
