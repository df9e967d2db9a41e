"""Worker of test_lxmert_ddp.py: VILLA updates of the tiny LXMERT under DDP (gloo, 2 CPU ranks)
with ``find_unused_parameters=False``; the dead visual half frozen (as built) or made trainable."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lxmert_testlib import make_batch, make_model
from villa_plugin.adversarial import AdversarialConfig, FreeATEngine


def _updates(freeze: bool, rank: int):
    model = make_model("vqa", seed=0)  # the same initial weights on both ranks
    if not freeze:
        for name in model.lxmert.unused_parameter_names():
            model.lxmert.get_parameter(name).requires_grad_(True)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    engine = FreeATEngine(AdversarialConfig.from_dict(
        {"adv_modality": ["image", "text"], "formulation": "exact", "adv_steps": 2, "adv_training": freeze}
    ))  # the control (unfrozen) runs plain steps: the failure does not depend on the loop
    try:
        for step in range(2):  # DDP reports unused parameters when the next forward starts
            ddp.zero_grad(set_to_none=True)
            engine.step(
                ddp, make_batch("vqa", seed=10 + rank + 2 * step),
                backward=lambda loss, retain_graph=False: loss.backward(retain_graph=retain_graph),
                sync_context=lambda last: contextlib.nullcontext() if last else ddp.no_sync(),
                kl_reduction=model.kl_reduction,
            )
    except RuntimeError as err:
        return {"ok": False, "error": str(err)[:300]}
    return {"ok": True, "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def worker(rank: int, world: int, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        results = {"frozen": _updates(True, rank), "unfrozen": _updates(False, rank)}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(workdir, f"rank{rank}.pt"))
