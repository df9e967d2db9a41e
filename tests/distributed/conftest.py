"""One 2-process gloo run executes every distributed case (spawn + init is the slow part); the
tests read its per-rank results. The single-process references are computed here too."""
from __future__ import annotations

import os
import time

import pytest
import torch

import villa_dist_helpers as h

STRATEGIES = ("ddp", "zero", "fairscale_sddp", "fsdp2")
PARITY = [
    {"id": f"{s}-{f}-accum{a}", "kind": "parity", "strategy": s, "formulation": f, "accum": a}
    for s in STRATEGIES
    for f in ("exact", "official")
    for a in (1, 2)
]
ADAMW = [{"id": f"{s}-adamw_hf", "kind": "parity", "strategy": s, "optimizer": "adamw_hf"} for s in STRATEGIES]
CLIP_MAX_NORM = 0.05
CLIP = [{"id": f"{s}-clip", "kind": "clip", "strategy": s, "max_norm": CLIP_MAX_NORM} for s in STRATEGIES]
CKPT_SAVE = [{"id": f"{s}-ckpt_save", "kind": "ckpt_save", "strategy": s} for s in STRATEGIES]
CKPT_LOAD = [{"id": f"{s}-ckpt_load", "kind": "ckpt_load", "strategy": s} for s in STRATEGIES]
NEGATIVE = [
    {"id": "sddp-no_nosync", "kind": "no_nosync", "strategy": "fairscale_sddp"},
    {"id": "sddp-set_to_none", "kind": "set_to_none", "strategy": "fairscale_sddp"},
    {"id": "sddp-torch_clip", "kind": "torch_clip", "strategy": "fairscale_sddp"},
    {"id": "ddp-torch_clip", "kind": "torch_clip", "strategy": "ddp"},
]
CASES = PARITY + ADAMW + CLIP + CKPT_SAVE + CKPT_LOAD + NEGATIVE


def single_process_checkpoint(path: str) -> None:
    """2 updates under strategy none, saved as the trainer would (full states)."""
    strategy, model, opt = h.build("none")
    h.run_updates(strategy, model, opt, h.make_updates(1)[:2])
    torch.save({"model": strategy.model_state_dict(model), "optimizer": strategy.optimizer_state_dict(opt)}, path)


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """``{"ranks": [results of rank 0, rank 1], "workdir": path, "seconds": wall time}``."""
    workdir = str(tmp_path_factory.mktemp("villa_dist_matrix"))
    single_process_checkpoint(os.path.join(workdir, "ckpt_single.pt"))
    start = time.perf_counter()
    h.spawn(h.matrix_worker, (h.WORLD, workdir, CASES), timeout_s=300)
    seconds = time.perf_counter() - start
    ranks = [torch.load(os.path.join(workdir, f"results_rank{r}.pt"), weights_only=True) for r in range(h.WORLD)]
    return {"ranks": [r["results"] for r in ranks], "timings": ranks[0]["timings"], "workdir": workdir, "seconds": seconds}


@pytest.fixture(scope="session")
def references():
    """Single-process references keyed like the cases, computed once."""
    cache = {}

    def get(accum=1, formulation="exact", optimizer="sgd", max_norm=None):
        key = (accum, formulation, optimizer, max_norm)
        if key not in cache:
            cache[key] = h.reference(accum, formulation, optimizer, max_norm)
        return cache[key]

    return get
