"""Per-rank memory and step time of the distributed strategies (measured, not asserted).

Default (CPU): ``--world`` gloo processes (2) run the same VILLA free-AT updates (K = 3, exact,
text + image perturbations, HF AdamW) on the registered UNITER VQA model of ``--hidden`` /
``--layers`` under ``ddp``, ``fairscale_sddp``, ``zero`` and ``fsdp2``, and report per rank:

- bytes of the parameters, gradients and optimizer state tensors this rank holds (DTensors count
  their local shard; OSS / ZeRO count their inner, per-rank optimizer). Counted from the tensors,
  not from the allocator: DDP's communication buckets and activations are not included;
- the median time of one update (zero_grad -> engine step -> clip -> optimizer step), the slowest
  rank's, and its ratio to ``ddp``.

Expect the sharded strategies to hold ~1/world of the optimizer state per rank (the sum over
ranks equals ddp's per-rank state), fsdp2 also ~1/world of parameters and gradients.

``--gpu-smoke``: one process on one GPU (NCCL, world 1), bf16 autocast, UNITER-base shapes
(768 x 12, batch 32, 40 text tokens, 36 regions): ``none``, ``fsdp2`` (bf16 MixedPrecisionPolicy;
``fsdp2/keep`` without resharding after forward) and ``fairscale_fsdp`` (bf16 compute), reporting
examples/s and peak GPU memory. A strategy that
fails is reported with its error instead of stopping the others.

Usage: ``python benchmarks/sharding.py [--world 2] [--out sharding.json]``;
``python benchmarks/sharding.py --gpu-smoke --out gpu.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from villa_plugin.adversarial import AdversarialConfig, FreeATEngine
from villa_plugin.common.sample_list import SampleList

CPU_STRATEGIES = ("ddp", "fairscale_sddp", "zero", "fsdp2")
GPU_STRATEGIES = ("none", "fsdp2", "fsdp2/keep", "fairscale_fsdp")
KEEP = "/keep"  # suffix: distributed.fsdp_reshard_after_forward=false (keep gathered params, ~ZeRO-2)
UNITER_BASE = dict(hidden=768, layers=12, heads=12, intermediate=3072, vocab=28996, batch=32, seq=40, boxes=36)
IMG_DIM = 2048


# -- model, batch, run config -------------------------------------------------------------------
def build_model(args) -> torch.nn.Module:
    """The registered UNITER model with a VQA head at the requested size, dropout 0."""
    from villa_plugin.models.registered import UNITER

    model = UNITER(
        {
            "uniter_config": "base",
            "architecture": {
                "vocab_size": args.vocab,
                "hidden_size": args.hidden,
                "num_hidden_layers": args.layers,
                "num_attention_heads": args.heads,
                "intermediate_size": args.intermediate,
            },
            "dropout": 0.0,
            "head": "vqa",
            "num_labels": args.num_labels,
            "losses": [{"type": "logit_bce"}],
        }
    )
    model.build()
    model.init_losses()
    return model


def freeze_unused(model: torch.nn.Module, batch) -> List[str]:
    """Stop training parameters that get no gradient from a plain forward/backward (UNITER's
    pretraining-only ``img_embeddings.mask_embedding``): DDP and ShardedDDP fail on them unless
    ``distributed.find_unused_parameters=true``. Equivalent for AdamW, which skips grad-less ones."""
    sum(model(batch)["losses"].values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, param in model.named_parameters():
        param.grad = None
        if name in unused:
            param.requires_grad_(False)
    return unused


def build_batch(args, device: torch.device, seed: int) -> SampleList:
    g = torch.Generator().manual_seed(seed)
    b, lt, nb = args.batch, args.seq, args.boxes
    return SampleList(
        input_ids=torch.randint(1, args.vocab, (b, lt), generator=g),
        position_ids=torch.arange(lt).unsqueeze(0),
        img_feat=torch.rand(b, nb, IMG_DIM, generator=g),
        img_pos_feat=torch.rand(b, nb, 7, generator=g),
        attn_masks=torch.ones(b, lt + nb, dtype=torch.long),
        targets=(torch.rand(b, args.num_labels, generator=g) > 0.99).float(),
        dataset_name="vqa2",
        dataset_type="train",
    ).to(device)


def run_config(strategy: str, precision: str, device: str):
    name = strategy[: -len(KEEP)] if strategy.endswith(KEEP) else strategy
    return OmegaConf.create(
        {
            "training": {"precision": precision, "device": device},
            "optimizer": {"type": "adamw_hf", "params": {"weight_decay": 0.01}, "no_decay": ["bias", "LayerNorm.bias", "LayerNorm.weight"], "lr_multipliers": {}},
            "distributed": {
                "strategy": name,
                "backend": "auto",
                "timeout_s": 600,
                "fsdp_reshard_after_forward": not strategy.endswith(KEEP),
            },
        }
    )


def make_optimizer(groups):
    from villa_plugin.optim import AdamW

    return AdamW(groups, lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)


def engine() -> FreeATEngine:
    return FreeATEngine(AdversarialConfig(adv_modality=("image", "text"), adv_steps=3, formulation="exact"))


# -- accounting ------------------------------------------------------------------------------------
def local_bytes(tensor) -> int:
    """Bytes this rank holds for ``tensor`` (a DTensor's local shard)."""
    if tensor is None or not torch.is_tensor(tensor):
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def optimizer_state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optim", optimizer)  # OSS and ZeroRedundancyOptimizer keep a local one
    return sum(local_bytes(v) for state in inner.state.values() for v in state.values())


def memory_row(model, optimizer) -> Dict[str, int]:
    params = list(model.parameters())
    return {
        "param_bytes": sum(local_bytes(p) for p in params),
        "grad_bytes": sum(local_bytes(p.grad) for p in params),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
    }


def one_update(strategy, model, optimizer, batch, forward_context) -> None:
    strategy.zero_grad(model, optimizer)
    engine().step(
        model,
        batch,
        backward=lambda loss, retain_graph=False: loss.backward(retain_graph=retain_graph),
        sync_context=lambda last: strategy.sync_context(model, last),
        is_last_micro_batch=True,
        kl_reduction=strategy.unwrap(model).kl_reduction,
        shapes=strategy.unwrap(model).perturbation_shapes(batch),
        forward_context=forward_context,
    )
    strategy.clip_grad_norm(model, optimizer, 2.0)
    optimizer.step()


def measure(name: str, args, device: torch.device, precision: str) -> Dict[str, Any]:
    """Build, warm up and time one strategy in this process."""
    from villa_plugin.registry import registry

    torch.manual_seed(0)
    config = run_config(name, precision, device.type)
    strategy = registry.get_strategy_class(config.distributed.strategy)(config, device)
    rank, world = strategy.rank, strategy.world_size
    batch = build_batch(args, device, seed=rank)
    bare = build_model(args).to(device)
    freeze_unused(bare, batch)
    model, optimizer = strategy.wrap(bare, make_optimizer)
    model.train()
    per_rank = args.batch
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        one_update(strategy, model, optimizer, batch, autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        one_update(strategy, model, optimizer, batch, autocast)
        sync()
        times.append(time.perf_counter() - start)
    row = {"strategy": name, "rank": rank, "world": world, "update_s": statistics.median(times)}
    row.update(memory_row(model, optimizer))
    row["examples_per_s"] = per_rank * world / row["update_s"]
    if device.type == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return row


# -- CPU: world-2 gloo --------------------------------------------------------------------------
def _cpu_worker(rank: int, world: int, workdir: str, args) -> None:
    from villa_plugin.distributed import launch

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    config = run_config("none", "fp32", "cpu")
    config.distributed.init_method = "file://" + os.path.join(workdir, "rendezvous")
    launch.setup(config)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rows = [measure(name, args, torch.device("cpu"), "fp32") for name in args.strategies]
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(os.path.join(workdir, "rows.json"), "w") as f:
            json.dump([row for rank_rows in gathered for row in rank_rows], f)
    launch.teardown()


def run_cpu(args) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        mp.spawn(_cpu_worker, args=(args.world, workdir, args), nprocs=args.world)
        with open(os.path.join(workdir, "rows.json")) as f:
            rows = json.load(f)
    return {"mode": "cpu", "world": args.world, "model": model_facts(args), "rows": rows, "summary": summarize(rows)}


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Per strategy: max-over-ranks bytes, their ratio to ddp, and the slowest rank's update time."""
    out: Dict[str, Dict[str, float]] = {}
    for name in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == name]
        out[name] = {k: max(r[k] for r in mine) for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "update_s")}
        out[name]["optimizer_state_bytes_sum"] = sum(r["optimizer_state_bytes"] for r in mine)
    base = out.get("ddp")
    if base:
        for stats in out.values():
            for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "update_s"):
                stats[f"{key}_vs_ddp"] = stats[key] / base[key] if base[key] else float("nan")
    return out


def model_facts(args) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in ("hidden", "layers", "heads", "intermediate", "vocab", "num_labels", "batch", "seq", "boxes")}


# -- GPU smoke: one GPU, world 1 ------------------------------------------------------------------
def _gpu_worker(rank: int, workdir: str, args) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method="file://" + os.path.join(workdir, "rendezvous"), rank=0, world_size=1)
    rows = []
    for name in args.strategies:
        try:
            rows.append(measure(name, args, torch.device("cuda", 0), "bf16"))
        except Exception as error:  # noqa: BLE001 - report and go on with the next strategy
            rows.append({"strategy": name, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        torch.cuda.empty_cache()
    with open(os.path.join(workdir, "rows.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def run_gpu_smoke(args) -> Dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu-smoke needs a CUDA GPU.")
    with tempfile.TemporaryDirectory() as workdir:
        mp.spawn(_gpu_worker, args=(workdir, args), nprocs=1)
        with open(os.path.join(workdir, "rows.json")) as f:
            rows = json.load(f)
    return {"mode": "gpu-smoke", "device": torch.cuda.get_device_name(0), "model": model_facts(args), "rows": rows}


# -- output ----------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table(result: Dict[str, Any]) -> str:
    if result["mode"] == "gpu-smoke":
        lines = ["| strategy | update (s) | examples/s | peak GPU MiB | params MiB | optimizer state MiB |", "|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if "error" in r:
                lines.append(f"| {r['strategy']} | failed: {r['error'].splitlines()[0][:80]} | | | | |")
            else:
                lines.append(
                    f"| {r['strategy']} | {r['update_s']:.4f} | {r['examples_per_s']:.1f} | {mib(r['peak_gpu_bytes'])} | "
                    f"{mib(r['param_bytes'])} | {mib(r['optimizer_state_bytes'])} |"
                )
        return "\n".join(lines)
    lines = [
        "| strategy | rank | params MiB | grads MiB | optimizer state MiB | update (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (CPU_STRATEGIES.index(r["strategy"]) if r["strategy"] in CPU_STRATEGIES else 99, r["rank"])):
        lines.append(
            f"| {r['strategy']} | {r['rank']} | {mib(r['param_bytes'])} | {mib(r['grad_bytes'])} | "
            f"{mib(r['optimizer_state_bytes'])} | {r['update_s']:.4f} |"
        )
    lines += ["", "| strategy | max optimizer state per rank vs ddp | max params vs ddp | max grads vs ddp | slowest update vs ddp |", "|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        if "optimizer_state_bytes_vs_ddp" in s:
            lines.append(
                f"| {name} | {s['optimizer_state_bytes_vs_ddp']:.3f} | {s['param_bytes_vs_ddp']:.3f} | "
                f"{s['grad_bytes_vs_ddp']:.3f} | {s['update_s_vs_ddp']:.2f}x |"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-smoke", action="store_true", help="one GPU, bf16, UNITER-base: none/fsdp2/fairscale_fsdp")
    p.add_argument("--world", type=int, default=2, help="CPU processes (gloo)")
    p.add_argument("--strategies", default=None, help="comma-separated; default per mode")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--num-labels", dest="num_labels", type=int, default=3129)
    p.add_argument("--batch", type=int, default=None, help="examples per rank")
    p.add_argument("--seq", type=int, default=None, help="text tokens")
    p.add_argument("--boxes", type=int, default=None, help="image regions")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed updates")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    defaults = dict(UNITER_BASE, warmup=3, steps=10) if args.gpu_smoke else dict(
        hidden=256, layers=4, heads=4, intermediate=1024, vocab=8000, batch=8, seq=20, boxes=10, warmup=1, steps=3
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = args.strategies.split(",") if args.strategies else list(GPU_STRATEGIES if args.gpu_smoke else CPU_STRATEGIES)
    args.strategies = [n.strip() for n in names if n.strip()]
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    result = run_gpu_smoke(args) if args.gpu_smoke else run_cpu(args)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
