"""End-to-end training throughput: the real trainer on VQA-shaped data in UNITER's formats.

``--suite train`` (default) writes (once, cached under ``--data-dir``) a generated VQA v2-shaped
dataset in UNITER's on-disk formats -- an img_db LMDB of msgpack fp16 region features with the
``conf`` threshold rule (``conf_th`` 0.2, 10-100 regions per image), a txt_db LMDB (lz4 + msgpack)
with 8-25 question tokens, ``ans2label.json`` with 3,129 answers -- then runs the ``mmf_run`` path
(``config=projects/villa/vqa.yaml`` composed by ``villa_plugin.config.compose.build_config``, the
registered trainer's ``run()``) with token-bucket batches of ``5120 x --token-scale`` tokens per
micro-batch and ``--update-frequency`` micro-batches per update (official: 5). ``--mode villa``
is VILLA K=3 ``exact`` on text (the official VQA recipe); ``--mode plain`` sets
``adv_training=false`` (the same trainer takes the plain step).

Reported (JSON with ``--out``, a markdown row on stdout), after ``--warmup`` updates:

- ``examples_per_s``; ``ms_per_update`` split into ``data`` (next micro-batches + host-to-device),
  ``forward_backward``, ``optimizer`` (zero_grad, unscale, clip, finite check, step, schedule)
  and ``logging`` (callbacks), from the trainer's opt-in :class:`PhaseTimer` (median and spread);
  ``overhead_pct``: (data + logging + unaccounted) / total;
- ``peak_memory_mb``: CUDA ``max_memory_allocated``, or the process's peak RSS on CPU;
- ``flops_per_example``: ``FlopCounterMode`` over one extra update's forward/backward after the
  timed ones; ``mfu`` = achieved FLOP/s / ``peak_tflops`` (``--peak-tflops``; defaults: the
  card's dense bf16/fp16 peak on known GPUs; on CPU the measured one-thread fp32 matmul rate, so
  CPU "MFU" is relative to what this core reaches on a large matmul);
- ``graphs`` with ``--compile`` (dynamo's unique graphs = compiles + recompiles).

``--suite data`` measures the data pipeline alone on the same files: per-example CPU cost of the
LMDB reads, msgpack / lz4 decoding, ``__getitem__`` and collation (``time.process_time``, so other
jobs on a shared machine do not inflate it), examples/s per worker core, and how many loader
workers a given GPU rate (``--gpu-rate``, default 1,070 examples/s) needs.

Usage::

    python benchmarks/train_throughput.py --size demo --token-scale 0.1 --mode villa
    python benchmarks/train_throughput.py --suite data
    python benchmarks/train_throughput.py --size base --device cuda --precision bf16 --workers 4
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from villa_plugin.datasets.features import write_img_db  # noqa: E402
from villa_plugin.datasets.text import write_txt_db  # noqa: E402

OFFICIAL_TOKENS = 5120  # training.batch_size_tokens of the official VQA recipe (per GPU)
NUM_ANSWERS = 3129
IMG_DIM = 2048
META = {"bert": "bert-base-cased", "CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [999, 28996]}
SIZES = {  # model_config.villa.architecture overrides of uniter-base
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    "demo": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": {},
}
GPU_PEAK_TFLOPS = {  # dense bf16/fp16 tensor-core peaks (fp32 runs use --peak-tflops)
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
}


# -- data -----------------------------------------------------------------------------------------
def confident_boxes(rng: np.random.Generator) -> int:
    """Boxes above conf 0.2 in one image: log-normal (median 30, long tail), as BUTD detections
    are; the nbb rule then clamps to [10, 100] (a spike at 10 from sparse images, a few at 100)."""
    return int(max(1, round(rng.lognormal(mean=math.log(30.0), sigma=0.6))))


def region_record(rng: np.random.Generator) -> Dict[str, np.ndarray]:
    confident = min(confident_boxes(rng), 120)
    rows = max(confident, 10)  # sparse images keep their 10 best boxes (below the threshold)
    conf = np.concatenate([rng.uniform(0.2001, 1.0, confident), rng.uniform(0.0, 0.2, rows - confident)])
    xy = rng.uniform(0, 0.6, size=(rows, 2))
    wh = rng.uniform(0.05, 0.4, size=(rows, 2))
    return {
        "features": rng.exponential(0.5, size=(rows, IMG_DIM)).astype(np.float16),  # post-ReLU-like
        "norm_bb": np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float16),
        "conf": conf.reshape(rows, 1).astype(np.float16),
    }


def write_vqa_shaped_data(root: str, questions: int, seed: int = 0) -> str:
    """UNITER-layout VQA data under ``root/uniter`` (cached: reused when complete); returns root."""
    done = os.path.join(root, "COMPLETE")
    if os.path.isfile(done):
        return root
    rng = np.random.default_rng(seed)
    uniter = os.path.join(root, "uniter")
    images = [f"coco_train2014_{i:012d}.npz" for i in range(max(1, questions // 5))]  # ~5 questions / image
    write_img_db(os.path.join(uniter, "img_db", "bench"), ((k, region_record(rng)) for k in images))

    def examples():
        for q in range(questions):
            n_labels = int(rng.integers(1, 4))
            yield f"{q}", {
                "input_ids": rng.integers(999, 28996, size=int(rng.integers(8, 26))).tolist(),
                "img_fname": images[int(rng.integers(0, len(images)))],
                "target": {"labels": rng.choice(NUM_ANSWERS, n_labels, replace=False).tolist(),
                           "scores": rng.choice([0.3, 0.6, 0.9, 1.0], n_labels).tolist()},
            }

    write_txt_db(os.path.join(uniter, "txt_db", "bench.db"), examples(), META)
    with open(os.path.join(uniter, "ans2label.json"), "w", encoding="utf-8") as fh:
        json.dump({f"answer{i}": i for i in range(NUM_ANSWERS)}, fh)
    open(done, "w").close()
    return root


def default_data_dir(questions: int, seed: int) -> str:
    tag = hashlib.sha1(f"v1-{questions}-{seed}".encode()).hexdigest()[:10]
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), f"villa_throughput_{tag}")


# -- config ---------------------------------------------------------------------------------------
def trainer_argv(args, data_dir: str, save_dir: str, max_updates: int) -> List[str]:
    """The mmf_run arguments of this run: the official VQA experiment with the benchmark's data,
    size, batch and precision."""
    argv = [
        "config=projects/villa/vqa.yaml",
        "run_type=train",
        f"env.data_dir={data_dir}",
        f"env.save_dir={save_dir}",
        f"env.cache_dir={os.path.join(save_dir, 'cache')}",
        "dataset_config.vqa2.txt_db.train=[txt_db/bench.db]",
        "dataset_config.vqa2.img_db.train=[img_db/bench]",
        "model_config.villa.pretrained_checkpoint=''",
        f"model_config.villa.adversarial.adv_training={str(args.mode == 'villa').lower()}",
        "model_config.villa.adversarial.formulation=exact",
        f"model_config.villa.adversarial.adv_steps={args.adv_steps}",
        f"training.max_updates={max_updates}",
        f"training.update_frequency={args.update_frequency}",
        f"training.batch_size_tokens={max(64, int(OFFICIAL_TOKENS * args.token_scale))}",
        f"training.num_workers={args.workers}",
        f"training.pin_memory={str(args.device.startswith('cuda')).lower()}",
        f"training.precision={args.precision}",
        f"training.device={args.device}",
        f"training.log_interval={args.log_interval}",
        "training.evaluation_interval=1000000",
        "training.checkpoint_interval=1000000",
        "training.tensorboard=false",
        "training.progress_bar=false",
        "scheduler.params.warmup_steps=1",
    ]
    if args.threads:
        argv.append(f"training.num_threads={args.threads}")
    if args.compile:
        argv.append("training.compile=true")
    argv += [f"model_config.villa.architecture.{k}={v}" for k, v in SIZES[args.size].items()]
    return argv + list(args.override)


# -- measurement ----------------------------------------------------------------------------------
def cpu_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """The best fp32 matmul rate of this process's threads (the CPU 'peak' for MFU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def peak_tflops(args, device: torch.device) -> Optional[float]:
    if args.peak_tflops:
        return float(args.peak_tflops)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    return cpu_matmul_tflops()


def probe_flops(trainer) -> Dict[str, float]:
    """FLOPs of the forward/backward of one more update (after the timed run), per example."""
    from torch.utils.flop_counter import FlopCounterMode

    batches = [b.to(trainer.device) for b in trainer._next_micro_batches()]
    counter = FlopCounterMode(display=False)
    with counter:
        for i, batch in enumerate(batches):
            trainer.run_training_batch(batch, is_last_micro_batch=i == len(batches) - 1)
    trainer.strategy.zero_grad(trainer.model, trainer.optimizer)
    examples = sum(b.get_batch_size() for b in batches)
    return {"flops": float(counter.get_total_flops()), "examples": float(examples)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def summarise(updates: List[Dict[str, float]]) -> Dict[str, Any]:
    """Median per-phase ms, the spread of the total, examples/s and the overhead share."""
    from villa_plugin.trainers.phase_timer import PHASES

    if not updates:
        raise RuntimeError("no timed updates: raise --updates or lower --warmup")
    total_s = sum(u["total"] for u in updates)
    phase_s = {p: sum(u[p] for u in updates) for p in PHASES}
    mean_ms = {p: 1e3 * phase_s[p] / len(updates) for p in PHASES}
    mean_ms["total"] = 1e3 * total_s / len(updates)
    mean_ms["other"] = mean_ms["total"] - sum(mean_ms[p] for p in PHASES)
    totals = sorted(1e3 * u["total"] for u in updates)
    overhead = mean_ms["data"] + mean_ms["logging"] + max(mean_ms["other"], 0.0)
    examples = sum(u["examples"] for u in updates)
    return {
        "updates_timed": len(updates),
        "examples_per_update": examples / len(updates),
        "examples_per_s": examples / total_s,
        "ms_per_update": mean_ms,
        "ms_per_update_median": statistics.median(totals),
        "ms_per_update_min": totals[0],
        "ms_per_update_max": totals[-1],
        "overhead_pct": 100.0 * overhead / mean_ms["total"],
    }


def run_train(args) -> Dict[str, Any]:
    """One benchmark run of the trainer; returns the report."""
    from villa_plugin.common.device import set_seed
    from villa_plugin.config.compose import build_config
    from villa_plugin.registry import registry
    from villa_plugin.trainers.phase_timer import PhaseTimer

    data_dir = args.data_dir or default_data_dir(args.questions, args.seed)
    write_vqa_shaped_data(data_dir, args.questions, args.seed)
    save_dir = args.save_dir or os.path.join(data_dir, f"save_{os.getpid()}")
    config = build_config(trainer_argv(args, data_dir, save_dir, args.warmup + args.updates))
    config.training.seed = set_seed(config.training.seed)
    if args.compile:
        import torch._dynamo as dynamo

        dynamo.reset()
        dynamo.utils.counters.clear()
    _init_single_process_group(config, save_dir)
    trainer = registry.get_trainer_class(config.training.trainer)(config)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    trainer.phase_timer = PhaseTimer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    report = summarise(trainer.phase_timer.updates[args.warmup:])
    report["peak_memory_mb"] = peak_memory_mb(device)
    probe = probe_flops(trainer)
    report["flops_per_example"] = probe["flops"] / max(probe["examples"], 1.0)
    report["achieved_tflops"] = report["flops_per_example"] * report["examples_per_s"] / 1e12
    peak = peak_tflops(args, device)
    report["peak_tflops"] = peak
    report["mfu"] = report["achieved_tflops"] / peak if peak else None
    if args.compile:
        import torch._dynamo as dynamo

        report["graphs"] = int(dynamo.utils.counters["stats"].get("unique_graphs", 0))
    report.update(
        suite="train", strategy=str(config.distributed.strategy), mode=args.mode, size=args.size, precision=args.precision, compile=bool(args.compile),
        device=_device_name(device), tokens_per_micro_batch=int(config.training.batch_size_tokens),
        update_frequency=args.update_frequency, workers=args.workers, adv_steps=args.adv_steps if args.mode == "villa" else 0,
    )
    return report


def _init_single_process_group(config, workdir: str) -> None:
    """A one-rank process group for a sharding strategy at world size 1 (mmf_run's launcher only
    initialises one under torchrun with WORLD_SIZE > 1)."""
    import torch.distributed as dist

    if str(config.distributed.strategy) == "none" or dist.is_initialized():
        return
    backend = "nccl" if str(config.training.device).startswith("cuda") else "gloo"
    os.makedirs(workdir, exist_ok=True)
    rendezvous = os.path.join(workdir, f"rendezvous_{os.getpid()}")
    if os.path.exists(rendezvous):
        os.remove(rendezvous)
    dist.init_process_group(backend, init_method="file://" + rendezvous, rank=0, world_size=1)


def run_data(args) -> Dict[str, Any]:
    """Per-example CPU cost of the data pipeline on the generated files."""
    from villa_plugin.config.compose import build_config
    from villa_plugin.datasets.features import decode_record
    from villa_plugin.datasets.text import decode_example
    from villa_plugin.registry import registry
    from villa_plugin.datasets.loader import build_batch_sampler

    data_dir = args.data_dir or default_data_dir(args.questions, args.seed)
    write_vqa_shaped_data(data_dir, args.questions, args.seed)
    config = build_config(trainer_argv(args, data_dir, os.path.join(data_dir, "save_data"), 1))
    builder = registry.get_builder_class("vqa2")("vqa2", config.dataset_config.vqa2)
    builder.prepare()
    dataset = builder.build_dataset("train")
    batches = list(iter(build_batch_sampler(dataset, config, "train", seed=args.seed)))
    n = min(args.data_examples, len(dataset))
    order = [i for b in batches for i in b][:n]
    img_db, txt_db = dataset.img_dbs[0], dataset._txt_dbs[0]
    keys = [(dataset.img_keys[i], dataset._txt_keys[i]) for i in order]

    def cpu_seconds(fn) -> float:
        best = float("inf")
        for _ in range(args.data_repeats):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        return best

    # img values as zero-copy views of the map, as ImgFeatDB reads them
    raw = [(img_db.db.get_view(k), txt_db.db.get(t)) for k, t in keys]
    costs = {
        "lmdb_get": cpu_seconds(lambda: [(img_db.db.get_view(k), txt_db.db.get(t)) for k, t in keys]),
        "img_decode_msgpack": cpu_seconds(lambda: [decode_record(v) for v, _ in raw]),
        "txt_decode_lz4_msgpack": cpu_seconds(lambda: [decode_example(v) for _, v in raw]),
        # each pass starts with no record CRC-verified (as a fresh worker); images repeated within
        # the pass (several questions per image) are verified once, as in training
        "getitem": cpu_seconds(lambda: (img_db._verified.clear(), [dataset[i] for i in order])),
    }
    items = [dataset[i] for i in order]
    sizes, start, groups = [len(b) for b in batches], 0, []
    for s in sizes:
        if start >= n:
            break
        groups.append(items[start:start + s])
        start += s
    costs["collate"] = cpu_seconds(lambda: [dataset.collate(g) for g in groups])
    per_example_us = {k: 1e6 * v / n for k, v in costs.items()}
    per_core = 1e6 / (per_example_us["getitem"] + per_example_us["collate"])
    nbbs = [img_db.nbb(k) for k, _ in keys]
    return {
        "suite": "data", "examples": n, "per_example_us": per_example_us,
        "examples_per_s_per_core": per_core,
        "workers_for_gpu_rate": math.ceil(args.gpu_rate / per_core), "gpu_rate": args.gpu_rate,
        "regions_mean": float(np.mean(nbbs)), "regions_at_min": float(np.mean(np.asarray(nbbs) == 10)),
        "regions_max": int(max(nbbs)), "examples_per_batch": float(np.mean(sizes)),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def markdown_row(r: Dict[str, Any]) -> str:
    if r["suite"] == "data":
        us = r["per_example_us"]
        return (f"| data | {r['examples']} | {us['lmdb_get']:.0f} | {us['img_decode_msgpack']:.0f} | "
                f"{us['txt_decode_lz4_msgpack']:.0f} | {us['getitem']:.0f} | {us['collate']:.0f} | "
                f"{r['examples_per_s_per_core']:.0f} | {r['workers_for_gpu_rate']} |")
    ms = r["ms_per_update"]
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    return (f"| {r['mode']} | {r['size']} | {r['precision']}{' compiled' if r['compile'] else ''} | "
            f"{r['examples_per_update']:.0f} | {r['examples_per_s']:.1f} | {ms['total']:.1f} "
            f"({r['ms_per_update_min']:.0f}-{r['ms_per_update_max']:.0f}) | {ms['data']:.1f} | "
            f"{ms['forward_backward']:.1f} | {ms['optimizer']:.1f} | {ms['logging']:.2f} | "
            f"{r['overhead_pct']:.1f}% | {r['peak_memory_mb']:.0f} | {mfu} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=["train", "data"], default="train")
    p.add_argument("--mode", choices=["plain", "villa"], default="villa")
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="training.compile=true (torch.compile of the model)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--token-scale", type=float, default=1.0, help="tokens per micro-batch = 5120 x this")
    p.add_argument("--update-frequency", type=int, default=5)
    p.add_argument("--adv-steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="training.num_workers")
    p.add_argument("--threads", type=int, default=0, help="training.num_threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--updates", type=int, default=10)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--questions", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="")
    p.add_argument("--save-dir", default="")
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--data-examples", type=int, default=1000)
    p.add_argument("--data-repeats", type=int, default=3)
    p.add_argument("--gpu-rate", type=float, default=1070.0)
    p.add_argument("--out", default="")
    p.add_argument("--override", nargs="*", default=[], help="extra mmf_run key=value overrides")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    report = run_data(args) if args.suite == "data" else run_train(args)
    print(json.dumps(report, indent=1, default=str))
    print(markdown_row(report))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
