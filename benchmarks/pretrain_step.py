"""Cost of one adversarial pre-training update vs a plain one, per task (MLM, MRFR, MRC-kl, ITM + WRA).

For each task: one optimizer update (zero_grad -> forward/backward -> AdamW step) of the registered
``uniter_pretrain`` model on one fixed batch of that task, plain (``adv_training: false``) and with
VILLA's free AT (``official`` and ``exact`` formulations, K = ``--steps``, text + image δ, the task's
consistency term: symmetric KL, MSE for MRFR). Batches are random captions / regions masked by the
real masking functions and collated by the real collates. Prints a markdown table with ratios to
plain. Timing and memory helpers are those of ``benchmarks/adv_step.py`` (median of interleaved
repeats; CPU memory = growth of the resident set's peak during one update, coarse; CUDA = peak
allocation during the update).

Usage: ``python benchmarks/pretrain_step.py [--preset base] [--out results.json]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import sys
from typing import Any, Dict, List

import torch
from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adv_step import _sync, cpu_peak_bytes, cuda_peak_bytes, time_updates  # noqa: E402  (sibling script)

from villa_plugin.adversarial import AdversarialConfig, FreeATEngine  # noqa: E402
from villa_plugin.tasks.pretrain.collate import itm_collate, mlm_collate, mrm_collate  # noqa: E402
from villa_plugin.tasks.pretrain.masking import TextSpecials, mlm_text, plain_text, region_mask  # noqa: E402
from villa_plugin.tasks.pretrain.registered import UniterPretrain  # noqa: E402

TASKS = ("mlm", "mrfr", "mrckl", "itm")
PRESETS = {
    "small": dict(hidden=128, layers=2, batch=16, seq=20, boxes=36, device="cpu"),
    "base": dict(hidden=768, layers=12, batch=64, seq=20, boxes=36, device="cuda"),
}
SPECIALS = TextSpecials(cls=101, sep=102, mask=103, v_range=(106, 28996))


def build_model(args) -> UniterPretrain:
    torch.manual_seed(0)
    model = UniterPretrain(OmegaConf.create({
        "uniter_config": "base", "dropout": 0.1,
        "architecture": {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
                         "num_attention_heads": max(1, args.hidden // 64), "intermediate_size": 4 * args.hidden},
        "adversarial": {"adv_training": True, "adv_tasks": list(TASKS), "consistency": {"mrfr": "mse"}},
    }))
    model.build()
    model.init_losses()
    return model


def build_batch(task: str, args, device):
    """``args.batch`` random (caption, image) rows of ``task``, masked and collated as in training."""
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.batch):
        tokens = [rng.randrange(*SPECIALS.v_range) for _ in range(args.seq)]
        row = {"id": i, "img_feat": torch.rand(args.boxes, 2048, generator=gen),
               "img_pos_feat": torch.rand(args.boxes, 7, generator=gen),
               "soft_labels": torch.softmax(torch.randn(args.boxes, 1601, generator=gen), -1)}
        if task == "mlm":
            row["input_ids"], row["txt_labels"] = mlm_text(tokens, SPECIALS, rng)
        else:
            row["input_ids"] = plain_text(tokens, SPECIALS)
            row["img_mask"] = region_mask(args.boxes, rng)
            row["target"] = i % 2
        rows.append(row)
    batch = mlm_collate(rows) if task == "mlm" else itm_collate(rows, True) if task == "itm" else mrm_collate(rows, task)
    batch.update(task=task, dataset_name="bench", dataset_type="train")
    return batch.to(device)


class TaskSetup:
    """Model, optimizer (state created) and one task's batch; ``update(engine)`` is one optimizer update."""

    def __init__(self, model, optimizer, task: str, args, device):
        self.model, self.optimizer, self.task, self.device = model, optimizer, task, device
        self.batch = build_batch(task, args, device)
        _, self.consistency = model.task_adversarial(task, AdversarialConfig())

    def update(self, engine: FreeATEngine) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        engine.step(self.model, self.batch, backward=lambda loss, retain_graph=False: loss.backward(retain_graph=retain_graph),
                    kl_reduction=self.model.kl_reduction, consistency=self.consistency)
        self.optimizer.step()


def engines(steps: int) -> Dict[str, FreeATEngine]:
    adv = AdversarialConfig(adv_modality=("image", "text"), adv_steps=steps)
    return {"plain": FreeATEngine(dataclasses.replace(adv, adv_training=False)),
            f"official K={steps}": FreeATEngine(dataclasses.replace(adv, formulation="official")),
            f"exact K={steps}": FreeATEngine(dataclasses.replace(adv, formulation="exact"))}


def run(args) -> Dict[str, Any]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():  # AdamW state created up front, so no variant pays for it
        p.grad = torch.zeros_like(p)
    optimizer.step()
    variants = engines(args.steps)
    rows: List[Dict[str, Any]] = []
    for task in TASKS:
        setup = TaskSetup(model, optimizer, task, args, device)
        seconds = time_updates(setup, list(variants.values()), args.warmup, args.repeats)
        memory = [None] * len(variants)
        if not args.no_memory:
            peak = cuda_peak_bytes if device.type == "cuda" else cpu_peak_bytes
            memory = [peak(setup, engine) for engine in variants.values()]
        _sync(device)
        for (name, _), sec, mem in zip(variants.items(), seconds, memory):
            rows.append({"task": task, "variant": name, "seconds": sec, "memory_bytes": mem})
    return {"device": str(device), "args": vars(args), "rows": rows}


def markdown(result: Dict[str, Any]) -> str:
    lines = ["| task | variant | ms / update | × plain | memory (MiB) | memory × plain |", "|---|---|---:|---:|---:|---:|"]
    for task in TASKS:
        rows = [r for r in result["rows"] if r["task"] == task]
        plain = rows[0]
        for r in rows:
            mem = r["memory_bytes"]
            mem_ratio = f"{mem / plain['memory_bytes']:.2f}" if mem and plain["memory_bytes"] else "–"
            mem_text = f"{mem / 2**20:.1f}" if mem is not None else "–"
            lines.append(f"| {task} | {r['variant']} | {1000 * r['seconds']:.1f} | {r['seconds'] / plain['seconds']:.2f} "
                         f"| {mem_text} | {mem_ratio} |")
    return "\n".join(lines)


OPTIONS = {  # flag: (type, default); the model / batch sizes default to the preset's
    "hidden": (int, None), "layers": (int, None), "batch": (int, None), "seq": (int, None), "boxes": (int, None),
    "device": (str, None), "steps": (int, 3), "warmup": (int, 2), "repeats": (int, 5), "threads": (int, 0),
    "out": (str, ""),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for name, (kind, default) in OPTIONS.items():
        parser.add_argument(f"--{name}", type=kind, default=default)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    return args


def main(argv=None) -> Dict[str, Any]:
    """Run, print the table, write the raw JSON to ``--out`` (when given)."""
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
