"""``mmf_extract``: region features for a folder of images, into UNITER's img_db and/or LXMERT's TSV.

    mmf_extract --images DIR --output DB_DIR --backend grid --weights random
    mmf_extract --config extract.yaml                 # any flag as a YAML key; flags override it

Re-running the same command resumes: images already in the outputs are skipped. Bad images are
converted (CMYK, grayscale, 16-bit, EXIF rotation, oversized) or skipped (unreadable, truncated, huge)
and listed in the report file; they never stop the run. Exit codes: 0 done, 1 a user error (printed as
one paragraph), 130 interrupted (everything committed so far is kept).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

import yaml

from villa_plugin.common.errors import UserError
from villa_plugin.features.config import DEFAULTS, FORMATS, resolve

PROG = "mmf_extract"


def parse_option(text: str):
    """``KEY=VALUE`` (VALUE read as YAML: numbers, lists, booleans) for ``--option``."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE, e.g. min_size=600")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DEFAULTS
    io = p.add_argument_group("input and output")
    io.add_argument("--images", action="append", metavar="DIR|GLOB|LIST",
                    help="a folder (searched recursively), a quoted glob, or a text file with one image path per "
                         "line; repeatable")
    io.add_argument("--output", metavar="DB_DIR", help="the image db directory, e.g. img_db/my_images (also holds "
                                                        "the TSV and the report unless --tsv / --report say otherwise)")
    io.add_argument("--format", choices=FORMATS, help=f"img_db (UNITER/VILLA), tsv (LXMERT obj36) or both "
                                                       f"[default: {d['format']}]")
    io.add_argument("--tsv", metavar="FILE", help="TSV path [default: DB_DIR/obj36.tsv]")
    io.add_argument("--tsv_boxes", type=int, help=f"boxes per TSV line (LXMERT: 36) [default: {d['tsv_boxes']}]")
    io.add_argument("--key_format", help="img_db key of an image from {stem}, {name}, {relstem} (path below the "
                                         f"folder, / -> _) [default: {d['key_format']}]")
    io.add_argument("--report", metavar="FILE", help="JSON report of converted / skipped images "
                                                     "[default: DB_DIR/extract_report.json]")
    io.add_argument("--config", metavar="YAML", help="settings file: any of these flags as keys, plus "
                                                     "backend_options: {...}; flags given here override it")
    model = p.add_argument_group("backend")
    model.add_argument("--backend", help=f"butd_r101 (the features UNITER/VILLA/LXMERT checkpoints were trained on), "
                                         f"torchvision_frcnn, or grid [default: {d['backend']}]")
    model.add_argument("--weights", metavar="FILE|random", help="the backend's weights file (see docs/own_data.md; "
                                                                "nothing is downloaded) or 'random'")
    model.add_argument("--option", action="append", type=parse_option, metavar="KEY=VALUE",
                       help="a backend option, e.g. min_size=600 or grid_size=10; repeatable")
    model.add_argument("--seed", type=int, help=f"seed of --weights random [default: {d['seed']}]")
    model.add_argument("--device", help=f"auto (CUDA when present), cpu, cuda, cuda:N [default: {d['device']}]")
    model.add_argument("--batch_size", type=int, help=f"images per batch (one commit each) [default: {d['batch_size']}]")
    model.add_argument("--num_workers", type=int, help=f"DataLoader decoding workers [default: {d['num_workers']}]")
    db = p.add_argument_group("img_db box count (UNITER's convert_imgdir: nbb = clamp(#(conf > conf_th), min_bb, max_bb))")
    db.add_argument("--conf_th", type=float, help=f"-1 = a fixed --num_bb [default: {d['conf_th']}]")
    db.add_argument("--max_bb", type=int, help=f"[default: {d['max_bb']}]")
    db.add_argument("--min_bb", type=int, help=f"[default: {d['min_bb']}]")
    db.add_argument("--num_bb", type=int, help=f"boxes when --conf_th -1 [default: {d['num_bb']}]")
    db.add_argument("--compressed", action="store_true", default=None, help="np.savez_compressed values")
    db.add_argument("--keep_all", action="store_true", default=None, help="store every box (db dir 'all')")
    images = p.add_argument_group("images")
    images.add_argument("--max_pixels", type=int, help=f"skip images with more pixels [default: {d['max_pixels']}]")
    images.add_argument("--max_side", type=int, help=f"downscale longer sides above this [default: {d['max_side']}]")
    images.add_argument("--log_interval", type=float, help="seconds between progress lines when not on a terminal "
                                                           f"[default: {d['log_interval']}]")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s : %(message)s")
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "option")}
    cli["backend_options"] = dict(args.option or [])
    try:
        from villa_plugin.features.extract import run_extraction

        settings = resolve(cli, args.config)
        report = run_extraction(settings)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the batches written so far are kept, re-run to continue.", file=sys.stderr)
        return 130
    summary = {k: report[k] for k in ("images_found", "already_done", "extracted", "counts", "images_per_s")}
    summary["skipped"] = len(report["skipped"])
    summary["report"] = settings["report"]
    print(json.dumps(summary))
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())

