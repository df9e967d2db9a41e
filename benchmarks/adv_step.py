"""Cost of one VILLA update vs plain fine-tuning: wall time, peak memory and FLOPs.

Measures, on one model and one fixed batch, one optimizer update (zero_grad -> forward/backward
-> AdamW step) for plain training and for the ``official`` and ``exact`` free-AT formulations at
K = 1, 2, 3, 5 (``--steps``), and prints a markdown table with ratios to plain.

- Model: the registered ``uniter`` model (VQA head, logit_bce) with ``--hidden/--layers/--batch/
  --seq/--boxes``; ``--preset base`` is UNITER-base (768 x 12, batch 32) on CUDA. If
  ``villa_plugin.models.registered`` cannot be imported, a small stand-in transformer is used.
- Time: median over ``--repeats`` updates (interleaved across variants) after ``--warmup`` ones (``torch.cuda.synchronize`` on
  GPU). Not asserted anywhere: CPU timings on small shared machines are noisy.
- Memory: on CUDA, ``max_memory_allocated`` during the update minus the allocation before it
  (model, batch and AdamW state already resident). On CPU (Linux), the growth of the resident
  set's peak during one update: ``VmHWM`` after resetting it (``/proc/self/clear_refs`` = 5, after
  ``malloc_trim``) minus ``VmRSS`` before; coarse (allocator slack included). tracemalloc does
  not see torch's allocations and ``ru_maxrss`` cannot be reset. ``--no-memory`` skips it.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the forward/backward of one update
  (matmul-class ops; the engine uses ``loss.backward()``, never ``autograd.grad``).

Usage: ``python benchmarks/adv_step.py [--preset base] [--out results.json]``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from villa_plugin.adversarial import AdversarialConfig, FreeATEngine
from villa_plugin.common.sample_list import SampleList

PRESETS = {
    "small": dict(hidden=128, layers=2, batch=8, seq=20, boxes=36, num_labels=3129, device="cpu"),
    "base": dict(hidden=768, layers=12, batch=32, seq=40, boxes=36, num_labels=3129, device="cuda"),
}
IMG_DIM = 2048


# -- model and batch ----------------------------------------------------------------------------
def build_model(args) -> nn.Module:
    """The registered UNITER VQA model at the requested size (a stand-in if it is unavailable)."""
    try:
        from villa_plugin.models.registered import UNITER
    except ImportError:  # pragma: no cover - the model package is part of the project
        return _StandIn(args)
    config = {
        "uniter_config": "base",
        "architecture": {
            "hidden_size": args.hidden,
            "num_hidden_layers": args.layers,
            "num_attention_heads": max(1, args.hidden // 64),
            "intermediate_size": 4 * args.hidden,
        },
        "dropout": 0.1,
        "head": "vqa",
        "num_labels": args.num_labels,
        "losses": [{"type": "logit_bce"}],
    }
    model = UNITER(config)
    model.build()
    model.init_losses()
    return model


class _StandIn(nn.Module):
    """Embeddings + transformer layers + classifier, accepting VILLA perturbations."""

    def __init__(self, args):
        super().__init__()
        h = args.hidden
        self.kl_reduction = "mean_times_classes"
        self.hidden = h
        self.words = nn.Embedding(1000, h)
        self.img_linear = nn.Linear(IMG_DIM, h)
        layer = nn.TransformerEncoderLayer(h, max(1, h // 64), 4 * h, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, args.layers)
        self.head = nn.Linear(h, args.num_labels)

    def forward(self, batch, perturbation=None):
        perturbation = perturbation or {}
        words, feat = self.words(batch["input_ids"]), batch["img_feat"]
        if perturbation.get("text") is not None:
            words = words + perturbation["text"]
        if perturbation.get("image") is not None:
            feat = feat + perturbation["image"]
        scores = self.head(self.encoder(torch.cat([words, self.img_linear(feat)], 1))[:, 0])
        loss = nn.functional.binary_cross_entropy_with_logits(scores, batch["targets"]) * scores.size(1)
        return {"scores": scores, "losses": {"train/bench/logit_bce": loss}}

    def perturbation_shapes(self, batch):
        b, lt = batch["input_ids"].shape
        return {"text": (b, lt, self.hidden), "image": tuple(batch["img_feat"].shape)}


def build_batch(args, device) -> SampleList:
    g = torch.Generator().manual_seed(0)
    b, lt, nb = args.batch, args.seq, args.boxes
    batch = SampleList(
        input_ids=torch.randint(1, 1000, (b, lt), generator=g),
        position_ids=torch.arange(lt).unsqueeze(0),
        img_feat=torch.rand(b, nb, IMG_DIM, generator=g),
        img_pos_feat=torch.rand(b, nb, 7, generator=g),
        attn_masks=torch.ones(b, lt + nb, dtype=torch.long),
        targets=(torch.rand(b, args.num_labels, generator=g) > 0.999).float(),
        dataset_name="vqa2",
        dataset_type="train",
    )
    return batch.to(device)


# -- variants ---------------------------------------------------------------------------------
def variants(steps: List[int]) -> List[Dict[str, Any]]:
    out = [{"name": "plain", "formulation": "-", "K": 0, "theory": 1.0}]
    for formulation in ("official", "exact"):
        for k in steps:
            theory = (5 * k + 1) / 3 if formulation == "official" else k + 1.0
            out.append({"name": f"{formulation}_K{k}", "formulation": formulation, "K": k, "theory": theory})
    return out


def make_engine(variant, modality) -> FreeATEngine:
    if variant["K"] == 0:
        return FreeATEngine(AdversarialConfig(adv_training=False))
    return FreeATEngine(
        AdversarialConfig(adv_modality=tuple(modality), adv_steps=variant["K"], formulation=variant["formulation"])
    )


class Setup:
    """Model, batch and optimizer (with its state created) on one device."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = build_model(args).to(self.device).train()
        self.batch = build_batch(args, self.device)
        self.kl_reduction = getattr(self.model, "kl_reduction", "mean_times_classes")
        self.dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        for p in self.model.parameters():  # create AdamW state now, so no variant pays for it
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, engine: FreeATEngine) -> None:
        engine.step(
            self.model, self.batch, backward=_backward, kl_reduction=self.kl_reduction, forward_context=self.autocast
        )

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def update(self, engine: FreeATEngine) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward(engine)
        self.optimizer.step()


def _backward(loss, retain_graph=False):
    loss.backward(retain_graph=retain_graph)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_updates(setup: Setup, engines: List[FreeATEngine], warmup: int, repeats: int) -> List[float]:
    """Median seconds per update for each engine; repeats interleave the engines (round robin)
    so that drifting machine load affects all of them alike."""
    for engine in engines:
        for _ in range(warmup):
            setup.update(engine)
    times: List[List[float]] = [[] for _ in engines]
    for _ in range(repeats):
        for i, engine in enumerate(engines):
            _sync(setup.device)
            start = time.perf_counter()
            setup.update(engine)
            _sync(setup.device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def count_flops(setup: Setup, engine: FreeATEngine) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    setup.optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        setup.forward_backward(engine)
    return int(counter.get_total_flops())


def cuda_peak_bytes(setup: Setup, engine: FreeATEngine) -> int:
    setup.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(setup.device)
    before = torch.cuda.memory_allocated(setup.device)
    torch.cuda.reset_peak_memory_stats(setup.device)
    setup.update(engine)
    torch.cuda.synchronize(setup.device)
    return int(torch.cuda.max_memory_allocated(setup.device) - before)


def cpu_peak_bytes(setup: Setup, engine: FreeATEngine) -> Optional[int]:
    """Growth of the resident set's peak during one update (Linux only, else None).

    Frees cached heap memory (``malloc_trim``), resets the kernel's peak-RSS mark
    (``/proc/self/clear_refs`` = 5), runs the update and reads ``VmHWM`` − the ``VmRSS`` before.
    Coarse: includes allocator slack and anything else the process allocates meanwhile.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    setup.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return None
    before = _proc_status_kib("VmRSS")
    setup.update(engine)
    return (_proc_status_kib("VmHWM") - before) * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


# -- driver -----------------------------------------------------------------------------------
def run(args) -> Dict[str, Any]:
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> Dict[str, Any]:
    setup = Setup(args)
    rows = [dict(v) for v in variants(args.steps)]
    engines = [make_engine(v, args.modality) for v in rows]
    for row, seconds in zip(rows, time_updates(setup, engines, args.warmup, args.repeats)):
        row["time_s"] = seconds
    for row, engine in zip(rows, engines):
        row["flops"] = count_flops(setup, engine)
        if args.memory:
            peak = cuda_peak_bytes(setup, engine) if setup.device.type == "cuda" else cpu_peak_bytes(setup, engine)
            row["peak_bytes"] = peak
    plain = rows[0]
    for row in rows:
        row["time_ratio"] = row["time_s"] / plain["time_s"]
        row["flop_ratio"] = row["flops"] / plain["flops"] if plain["flops"] else float("nan")
        if row.get("peak_bytes") is not None and plain.get("peak_bytes"):
            row["memory_ratio"] = row["peak_bytes"] / plain["peak_bytes"]
    return {
        "device": _device_name(setup.device),
        "model": type(setup.model).__name__,
        "size": {k: getattr(args, k) for k in ("hidden", "layers", "batch", "seq", "boxes", "num_labels")},
        "modality": list(args.modality),
        "precision": args.precision,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "memory_method": None if not args.memory else (
            "cuda max_memory_allocated minus allocation before the update" if setup.device.type == "cuda"
            else "peak RSS growth of one update (VmHWM after clear_refs=5, minus VmRSS before; malloc_trim first)"
        ),
        "torch": torch.__version__,
        "rows": rows,
    }  # fmt: skip


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def markdown(result: Dict[str, Any]) -> str:
    lines = [
        f"device: {result['device']}; model: {result['model']} {result['size']}; modality {result['modality']}; "
        f"{result['precision']}; "
        f"median of {result['repeats']} after {result['warmup']} warm-up",
        "",
        "| variant | K | time (ms) | time × plain | GFLOP | FLOP × plain | theory × | peak mem (MB) | mem × plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mem = f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") is not None else "-"
        mem_ratio = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else "-"
        lines.append(
            f"| {r['name']} | {r['K'] or '-'} | {r['time_s'] * 1e3:.1f} | {r['time_ratio']:.2f} | "
            f"{r['flops'] / 1e9:.2f} | {r['flop_ratio']:.2f} | {r['theory']:.2f} | {mem} | {mem_ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for key in ("hidden", "layers", "batch", "seq", "boxes"):
        parser.add_argument(f"--{key}", type=int, default=None)
    parser.add_argument("--num-labels", dest="num_labels", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the preset's)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5], help="values of K")
    parser.add_argument("--modality", nargs="+", default=["text"], help="adv_modality, e.g. text or image text")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast forwards")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default 1: steadier on a busy machine)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested but CUDA is not available; use --device cpu")
    AdversarialConfig(adv_modality=tuple(args.modality))  # validate early
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
