"""The extraction run: list images, skip those already written, decode in DataLoader workers, run the
backend batch by batch, commit each batch, report what was converted or skipped."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from villa_plugin.common.errors import ConfigError
from villa_plugin.features.backends import build_backend
from villa_plugin.features.images import ImageDataset, collate_samples, make_items
from villa_plugin.features.writers import ImgDbWriter, TsvWriter, write_json_atomic

logger = logging.getLogger("villa_plugin.features")


def select_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r}: {err}. Use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                          f"use --device cpu or auto.")
    return device


def open_writers(s: Dict[str, Any]) -> Dict[str, Any]:
    writers: Dict[str, Any] = {}
    if s["format"] in ("img_db", "both"):
        writers["img_db"] = ImgDbWriter(s["output"], s["conf_th"], s["max_bb"], s["min_bb"], s["num_bb"],
                                        s["compressed"], s["keep_all"], s["sync_seconds"])
    if s["format"] in ("tsv", "both"):
        writers["tsv"] = TsvWriter(s["tsv"], s["tsv_boxes"])
    return writers


def tsv_id(key: str) -> str:
    """LXMERT's ``img_id``: the key without UNITER's ``.npz`` suffix."""
    return key[:-4] if key.endswith(".npz") else key


class Progress:
    """tqdm bar (images/s) on a terminal; otherwise a log line every ``interval`` seconds."""

    def __init__(self, total: int, interval: float):
        self.total, self.interval, self.done, self.start = total, interval, 0, time.monotonic()
        self._last = self.start
        self.bar = tqdm(total=total, unit="img", desc="mmf_extract", dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval or self.done == self.total:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"mmf_extract: {self.done}/{self.total} images ({rate:.2f} images/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def extract_batch(backend, samples: List[dict], report: Dict[str, Any], counts: Counter):
    """The backend on a batch; if it fails (e.g. out of memory on one huge image), image by image,
    skipping (and reporting) the ones that still fail."""
    if not samples:
        return [], []
    try:
        return samples, [r.cpu() for r in backend.extract([s["input"] for s in samples])]
    except (RuntimeError, ValueError) as err:
        logger.warning("backend failed on a batch (%s); retrying its images one by one", err)
    good, regions = [], []
    for sample in samples:
        try:
            regions.append(backend.extract([sample["input"]])[0].cpu())
            good.append(sample)
        except (RuntimeError, ValueError) as err:
            report["skipped"][sample["path"]] = f"backend-error: {err}"
            counts["skipped:backend-error"] += 1
    return good, regions


def triage(batch: List[dict], report: Dict[str, Any], counts: Counter) -> List[dict]:
    """The decodable samples of a batch; skipped and converted ones are counted and listed."""
    good = []
    for sample in batch:
        if sample["skip_reason"]:
            report["skipped"][sample["path"]] = sample["skip_reason"]
            counts["skipped:" + sample["skip_reason"].split(":", 1)[0]] += 1
            continue
        for note in sample["conversions"]:
            counts["converted:" + note] += 1
        if sample["conversions"]:
            report["converted"][sample["path"]] = sample["conversions"]
        good.append(sample)
    return good


def write_batch(writers: Dict[str, Any], done_in: Dict[str, set], samples: List[dict], regions: List) -> None:
    """One commit per output of the batch's regions (skipping keys an output already holds)."""
    for name, writer in writers.items():
        if name == "img_db":
            writer.add([(s["key"], r) for s, r in zip(samples, regions) if s["key"] not in done_in[name]])
        else:
            writer.add([(tsv_id(s["key"]), *s["original_size"], r) for s, r in zip(samples, regions)
                        if tsv_id(s["key"]) not in done_in[name]])


def run_extraction(s: Dict[str, Any]) -> Dict[str, Any]:
    """Extract every image of ``s["images"]`` not yet in the outputs; returns (and writes) the report."""
    items = make_items(s["images"], s["key_format"])
    os.makedirs(s["output"], exist_ok=True)
    writers = open_writers(s)
    done_in = {name: w.keys() for name, w in writers.items()}
    id_of = {"img_db": lambda k: k, "tsv": tsv_id}
    todo = [it for it in items if any(id_of[n](it.key) not in done_in[n] for n in writers)]
    device = select_device(s["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.manual_seed(s["seed"])  # random weights are reproducible too
    backend = build_backend(s["backend"], s["backend_options"], s["weights"]).to(device)
    if not backend.has_vg_classes:
        logger.warning("backend %s has no Visual Genome classifier: soft_labels hold background only and TSV "
                       "objects / attributes are -1 (fine for fine-tuning; not for MRC pre-training).", s["backend"])
    loader = DataLoader(ImageDataset(todo, backend.preprocess, s["max_pixels"], s["max_side"]),
                        batch_size=s["batch_size"], num_workers=s["num_workers"], shuffle=False,
                        collate_fn=collate_samples)
    report: Dict[str, Any] = {"backend": s["backend"], "weights": s["weights"], "device": str(device),
                              "images_found": len(items), "already_done": len(items) - len(todo), "extracted": 0,
                              "skipped": {}, "converted": {}, "counts": {}}
    counts: Counter = Counter()
    progress = Progress(len(todo), s["log_interval"])
    start = time.monotonic()
    try:
        for batch in loader:
            good, regions = extract_batch(backend, triage(batch, report, counts), report, counts)
            write_batch(writers, done_in, good, regions)
            report["extracted"] += len(good)
            progress.update(len(batch))
    finally:
        progress.close()
        for writer in writers.values():
            writer.close()
        seconds = time.monotonic() - start
        report.update(counts=dict(sorted(counts.items())), seconds=round(seconds, 3),
                      images_per_s=round(report["extracted"] / seconds, 3) if seconds > 0 else None,
                      outputs={n: (w.db_path if n == "img_db" else w.path) for n, w in writers.items()})
        write_json_atomic(s["report"], report)
    return report
