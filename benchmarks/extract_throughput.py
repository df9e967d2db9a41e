"""Feature-extraction throughput of ``mmf_extract``'s backends: images per second, end to end.

For each backend, ``--images`` generated JPEGs of ``--size`` (default 640x480, a typical COCO image)
go through the real extraction run (:func:`villa_plugin.features.extract.run_extraction`: DataLoader
decoding, the backend at its default settings unless ``--option`` says otherwise, the img_db writer
with one commit per batch). The rate is the run's own ``images_per_s`` (model building excluded),
after one warm-up run on ``--warmup`` images. Weights are random (throughput does not depend on their
values) unless ``--weights BACKEND=FILE`` is given.

Usage: ``python benchmarks/extract_throughput.py [--device cpu|cuda] [--backends grid butd_r101]
[--images 8] [--threads 1] [--out results.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from villa_plugin.features.config import DEFAULTS
from villa_plugin.features.extract import run_extraction

BACKENDS = ("grid", "torchvision_frcnn", "butd_r101")


def make_images(folder: str, count: int, size) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(count):
        # smooth random blobs rather than noise: JPEG decoding cost like a photo's
        small = rng.rand(size[1] // 16, size[0] // 16, 3) * 255
        Image.fromarray(small.astype(np.uint8)).resize(size, Image.BILINEAR).save(
            os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def measure(backend: str, weights: str, folder: str, out: str, args) -> dict:
    settings = dict(DEFAULTS, images=[folder], output=out, backend=backend, weights=weights,
                    backend_options=dict(args.option.get(backend, {})), device=args.device,
                    batch_size=args.batch_size, num_workers=args.num_workers, log_interval=1e9,
                    tsv=os.path.join(out, "obj36.tsv"), report=os.path.join(out, "report.json"))
    start = time.monotonic()
    report = run_extraction(settings)
    return {"backend": backend, "images": report["extracted"], "images_per_s": report["images_per_s"],
            "wall_s_incl_build": round(time.monotonic() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--weights", nargs="*", default=[], metavar="BACKEND=FILE")
    parser.add_argument("--option", nargs="*", default=[], metavar="BACKEND.KEY=VALUE",
                        help="backend options, e.g. butd_r101.post_nms_topk=100")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    weights = dict(w.split("=", 1) for w in args.weights)
    options: dict = {}
    for item in args.option:
        key, value = item.split("=", 1)
        backend, name = key.split(".", 1)
        options.setdefault(backend, {})[name] = json.loads(value)
    args.option = options
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_images(os.path.join(tmp, "warm"), args.warmup, tuple(args.size))
        make_images(os.path.join(tmp, "imgs"), args.images, tuple(args.size))
        for backend in args.backends:
            w = weights.get(backend, "random")
            measure(backend, w, os.path.join(tmp, "warm"), os.path.join(tmp, f"{backend}_warm"), args)
            rows.append(measure(backend, w, os.path.join(tmp, "imgs"), os.path.join(tmp, backend), args))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\n{device}, {args.size[0]}x{args.size[1]} JPEGs, batch {args.batch_size}, {args.num_workers} decoding worker(s)\n")
    print("| backend | images | images/s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['images']} | {row['images_per_s']:.2f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"device": device, "args": {k: v for k, v in vars(args).items()}, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
