"""Shared pieces of the distributed tests: a tiny model that accepts VILLA's perturbation dict,
deterministic data, one update loop driven by the real free-AT engine, and a bounded 2-process
spawn with file:// rendezvous. Spawned workers import this module by name (pytest puts this
folder on sys.path and multiprocessing's spawn passes sys.path to the children)."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from villa_plugin.adversarial import AdversarialConfig, FreeATEngine
from villa_plugin.distributed.base import SingleProcessStrategy
from villa_plugin.distributed.ddp import DDPStrategy
from villa_plugin.distributed.fairscale_fsdp import FairscaleFSDPStrategy
from villa_plugin.distributed.fairscale_sddp import FairscaleShardedDDPStrategy
from villa_plugin.distributed.fsdp2 import FSDP2Strategy
from villa_plugin.distributed.zero import ZeroStrategy

H, VOCAB, L_TXT, N_IMG, IMG_DIM, CLASSES = 8, 20, 5, 3, 6, 4
GLOBAL_BATCH, WORLD, UPDATES = 8, 2, 3
SGD_LR, SGD_MOMENTUM, WEIGHT_DECAY = 0.5, 0.9, 0.01


# The adapters by their registered names (imported directly: the registry's lazy loading of every
# built-in is tested elsewhere, and must not make these tests depend on unrelated modules).
STRATEGY_CLASSES = {
    cls.name: cls for cls in (
        SingleProcessStrategy, DDPStrategy, ZeroStrategy, FairscaleShardedDDPStrategy, FSDP2Strategy, FairscaleFSDPStrategy
    )
}


# -- model ------------------------------------------------------------------------------------
class TinyLayer(nn.Module):
    """A residual block named like a transformer layer (an FSDP sharding unit)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(H, H)
        self.LayerNorm = nn.LayerNorm(H)

    def forward(self, x):
        return self.LayerNorm(x + torch.tanh(self.dense(x)))


class TinyEncoder(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.layer = nn.ModuleList([TinyLayer() for _ in range(layers)])


class TinyVilla(nn.Module):
    """Text embedding + raw image features, perturbed where UNITER perturbs them; VQA-style loss."""

    kl_reduction = "mean_times_classes"

    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, H)
        self.position_embeddings = nn.Parameter(torch.randn(L_TXT, H) * 0.1)
        self.LayerNorm = nn.LayerNorm(H)
        self.img_linear = nn.Linear(IMG_DIM, H)
        self.encoder = TinyEncoder()
        self.classifier = nn.Linear(H, CLASSES)

    def forward(self, batch, perturbation=None):
        perturbation = perturbation or {}
        words = self.word_embeddings(batch["input_ids"])
        if perturbation.get("text") is not None:
            words = words + perturbation["text"]
        text = self.LayerNorm(words + self.position_embeddings)
        feats = batch["img_feat"]
        if perturbation.get("image") is not None:
            feats = feats + perturbation["image"]
        x = torch.cat([text, self.img_linear(feats)], dim=1)
        for layer in self.encoder.layer:
            x = layer(x)
        scores = self.classifier(x.mean(dim=1))
        out = {"scores": scores, "losses": {}}
        if "targets" in batch:
            bce = F.binary_cross_entropy_with_logits(scores, batch["targets"], reduction="none")
            out["losses"]["train/tiny/logit_bce"] = bce.mean() * CLASSES
        return out

    def perturbation_shapes(self, batch):
        b = batch["input_ids"].size(0)
        return {"text": (b, L_TXT, H), "image": (b, N_IMG, IMG_DIM)}

    def get_optimizer_parameters(self, optimizer_config=None):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            (no_decay if ("bias" in name or "LayerNorm" in name) else decay).append(param)
        return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def new_model() -> TinyVilla:
    torch.manual_seed(0)
    return TinyVilla()


# -- data ---------------------------------------------------------------------------------------
def make_updates(accum: int, updates: int = UPDATES, seed: int = 1) -> List[List[Dict[str, torch.Tensor]]]:
    """``updates`` lists of ``accum`` global micro-batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(updates):
        micro = []
        for _ in range(accum):
            micro.append(
                {
                    "input_ids": torch.randint(0, VOCAB, (GLOBAL_BATCH, L_TXT), generator=g),
                    "img_feat": torch.randn(GLOBAL_BATCH, N_IMG, IMG_DIM, generator=g),
                    "targets": torch.rand(GLOBAL_BATCH, CLASSES, generator=g),
                }
            )
        out.append(micro)
    return out


def shard(batch: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
    n = GLOBAL_BATCH // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


# -- one run --------------------------------------------------------------------------------------
def make_config(strategy: str = "none", device: str = "cpu", precision: str = "fp32"):
    return OmegaConf.create(
        {
            "training": {"precision": precision, "device": device},
            "optimizer": {"enable_state_sharding": False},
            "distributed": {"strategy": strategy, "backend": "gloo", "timeout_s": 60},
        }
    )


def make_sgd(groups):
    return torch.optim.SGD(groups, lr=SGD_LR, momentum=SGD_MOMENTUM)


def make_adamw(groups):
    from villa_plugin.optim import AdamW

    return AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=WEIGHT_DECAY)


OPTIMIZERS = {"sgd": make_sgd, "adamw_hf": make_adamw}


def build(strategy_name: str, optimizer: str = "sgd", device: str = "cpu", precision: str = "fp32"):
    strategy = STRATEGY_CLASSES[strategy_name](make_config(strategy_name, device, precision), torch.device(device))
    model, opt = strategy.wrap(new_model().to(device), OPTIMIZERS[optimizer])
    model.train()
    return strategy, model, opt


def snapshot(strategy, model) -> Dict[str, torch.Tensor]:
    """Full parameters (DTensors gathered: a collective for fsdp2)."""
    if strategy.name == "fairscale_fsdp":  # full, unprefixed names (the tiny model has no buffers)
        return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    out = {}
    for name, param in strategy.unwrap(model).named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = value.detach().clone().cpu()
    return out


def engine_for(formulation: str) -> FreeATEngine:
    return FreeATEngine(
        AdversarialConfig(
            adv_modality=("image", "text"),
            adv_steps=3,
            adv_lr_txt=0.3,
            adv_lr_img=0.3,
            adv_kl_weight=1.5,
            formulation=formulation,
        )
    )


def backward(loss, retain_graph=False):
    loss.backward(retain_graph=retain_graph)


def run_updates(
    strategy,
    model,
    optimizer,
    updates,
    *,
    rank: int = 0,
    world: int = 1,
    formulation: str = "exact",
    zero_grad: Optional[Callable] = None,
    sync_context: Optional[Callable] = None,
    max_norm: Optional[float] = None,
    forward_context: Optional[Callable] = None,
) -> Dict[str, list]:
    """The trainer's per-update semantics (architecture.md "Trainer") with the free-AT engine:
    zero grads, one engine step per micro-batch (sync only on the update's last backward),
    optional clipping, optimizer step. Returns per-update parameter snapshots, norms, stats."""
    engine = engine_for(formulation)
    zero_grad = zero_grad or strategy.zero_grad
    sync_context = sync_context or (lambda last: strategy.sync_context(model, last))
    record = {"params": [], "norms": [], "stats": []}
    for micro_batches in updates:
        zero_grad(model, optimizer)
        for i, batch in enumerate(micro_batches):
            local = {k: v.to(strategy.device) for k, v in shard(batch, rank, world).items()}
            stats = engine.step(
                model,
                local,
                backward=backward,
                sync_context=sync_context,
                is_last_micro_batch=i == len(micro_batches) - 1,
                kl_reduction=TinyVilla.kl_reduction,
                shapes=strategy.unwrap(model).perturbation_shapes(local),
                forward_context=forward_context,
            )
            record["stats"].append({k: v.detach().float().clone() for k, v in stats.items()})
        if max_norm is not None:
            record["norms"].append(torch.as_tensor(strategy.clip_grad_norm(model, optimizer, max_norm)).detach().clone())
        optimizer.step()
        record["params"].append(snapshot(strategy, model))
    return record


def max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].detach().double() - b[k].detach().double()).abs().max()) for k in a)


def reference(accum: int, formulation: str = "exact", optimizer: str = "sgd", max_norm=None, updates=None, device="cpu"):
    """The single-process run on the same global batches."""
    strategy, model, opt = build("none", optimizer, device)
    return run_updates(strategy, model, opt, updates or make_updates(accum), formulation=formulation, max_norm=max_norm)


# -- spawning ---------------------------------------------------------------------------------------
def init_worker(rank: int, world: int, workdir: str, strategy: str = "none"):
    """Set torchrun's variables and let the launcher initialise gloo over a file:// rendezvous."""
    from villa_plugin.distributed import launch

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    config = make_config(strategy)
    config.distributed.init_method = "file://" + os.path.join(workdir, "rendezvous")
    torch.set_num_threads(1)
    return launch.setup(config)


def spawn(fn: Callable, args: tuple, nprocs: int = WORLD, timeout_s: float = 240.0) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes; an error or the timeout ends all of them."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                with contextlib.suppress(Exception):
                    process.kill()
            raise TimeoutError(f"spawned workers did not finish within {timeout_s:.0f} s")


# -- the batched matrix worker -----------------------------------------------------------------------
def run_case(case: Dict[str, Any], rank: int, world: int, workdir: str, device: str = "cpu") -> Dict[str, Any]:
    """One case of the distributed matrix on this rank (see conftest.CASES)."""
    kind, name = case["kind"], case["strategy"]
    precision = case.get("precision", "fp32")
    strategy, model, opt = build(name, case.get("optimizer", "sgd"), device, precision)
    updates = make_updates(case.get("accum", 1))
    common = dict(rank=rank, world=world, formulation=case.get("formulation", "exact"))
    if precision == "bf16":
        common["forward_context"] = lambda: torch.autocast(device, dtype=torch.bfloat16)
    if kind == "no_nosync":
        return run_updates(strategy, model, opt, updates, sync_context=lambda last: contextlib.nullcontext(), **common)
    if kind == "set_to_none":
        return run_updates(strategy, model, opt, updates, zero_grad=lambda m, o: o.zero_grad(), **common)
    if kind == "clip":
        return run_updates(strategy, model, opt, updates[:1], max_norm=case["max_norm"], **common)
    if kind == "torch_clip":  # torch's clip_grad_norm_ on this rank's grads under the wrapper
        run_updates(strategy, model, opt, updates[:1], **common)  # (after the step: grads still there)
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        return {"torch_norm": torch.nn.utils.clip_grad_norm_(params, float("inf")).detach().clone()}
    if kind == "ckpt_save":
        first = run_updates(strategy, model, opt, updates[:2], **common)
        saved = {"model": strategy.model_state_dict(model), "optimizer": strategy.optimizer_state_dict(opt)}
        if rank == 0:
            torch.save(saved, os.path.join(workdir, f"ckpt_{case['id']}.pt"))
        else:
            assert saved["optimizer"] is None and saved["model"] is None, "only rank 0 returns the full state"
        rest = run_updates(strategy, model, opt, updates[2:], **common)
        return {"params": first["params"] + rest["params"]}
    if kind == "ckpt_load":
        state = torch.load(os.path.join(workdir, "ckpt_single.pt"), weights_only=True)
        strategy.load_model_state_dict(model, state["model"])
        strategy.load_optimizer_state_dict(opt, state["optimizer"])
        return run_updates(strategy, model, opt, updates[2:], **common)
    assert kind == "parity", kind
    return run_updates(strategy, model, opt, updates, **common)


def matrix_worker(rank: int, world: int, workdir: str, cases: List[Dict[str, Any]]) -> None:
    init_worker(rank, world, workdir)
    results, timings = {}, {}
    for case in cases:
        start = time.perf_counter()
        results[case["id"]] = run_case(case, rank, world, workdir)
        timings[case["id"]] = time.perf_counter() - start
    torch.save({"results": results, "timings": timings}, os.path.join(workdir, f"results_rank{rank}.pt"))
    from villa_plugin.distributed import launch

    launch.teardown()
