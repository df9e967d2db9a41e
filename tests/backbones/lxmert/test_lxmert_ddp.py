"""The frozen dead visual half keeps DDP working without find_unused_parameters (lxmert.md §2)."""
from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo  # noqa: F401  (DDP imports it; once here, not in each forked worker)
import torch.multiprocessing as mp

import lxmert_ddp_worker

WORLD = 2


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_villa_updates_under_ddp_without_find_unused_parameters(tmp_path):
    context = mp.start_processes(lxmert_ddp_worker.worker, args=(WORLD, str(tmp_path)), nprocs=WORLD,
                                 join=False, start_method="fork")
    for process in context.processes:
        process.join(timeout=120)
    alive = [p for p in context.processes if p.is_alive()]
    for process in alive:
        process.terminate()
    assert not alive, "DDP workers hung"
    assert all(p.exitcode == 0 for p in context.processes)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]

    frozen = [r["frozen"] for r in ranks]
    assert all(r["ok"] for r in frozen)
    grads0, grads1 = frozen[0]["grads"], frozen[1]["grads"]
    assert set(grads0) == set(grads1) and len(grads0) > 0
    for name in grads0:  # all-reduced: the same gradient on both ranks
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-6, atol=1e-9), name

    # Control: the same parameters left trainable make DDP fail, so the freeze is what fixes it.
    assert all(not r["unfrozen"]["ok"] for r in ranks)
    assert "find_unused_parameters" in ranks[0]["unfrozen"]["error"] or "reduction" in ranks[0]["unfrozen"]["error"]
