"""Converters into UNITER's formats (usable from Python or ``python -m villa_plugin.datasets.convert``).

- :func:`convert_npz_dir_to_img_db`: a directory of BUTD per-image ``.npz`` files -> an img_db
  (UNITER's ``scripts/convert_imgdir.py`` semantics; keys are the npz basenames).
- :func:`build_vqa_txt_db`: VQA v2 question (+ annotation) JSON -> a VQA txt_db (our own
  preprocessing: UNITER never released one; answers normalised and scored as in vqa_answers.py).

MMF's pickled feature LMDBs are deliberately not readable here (unpickling untrusted files is unsafe,
and they are Detectron features, not BUTD ones).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from villa_plugin.common.errors import DataError
from villa_plugin.datasets.task_common import read_json
from villa_plugin.tasks.vqa.builder import image_key
from villa_plugin.tasks.vqa.answers import soft_target
from villa_plugin.tasks.vqa.dataset import read_label2ans
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import WordPieceTokenizer, write_txt_db

logger = logging.getLogger(__name__)
NPZ_FIELDS = ("features", "norm_bb", "conf")


def _npz_records(files: Sequence[str], skipped: List[str]) -> Iterator[Tuple[str, Dict[str, np.ndarray]]]:
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as npz:
                rec = {k: npz[k] for k in npz.files}
            missing = [f for f in NPZ_FIELDS if f not in rec]
            if missing:
                raise ValueError(f"missing fields {missing}")
        except Exception as err:  # corrupt file: skipped and reported, as convert_imgdir does
            logger.warning("skipping corrupt feature file %s: %s", path, err)
            skipped.append(path)
            continue
        yield os.path.basename(path), rec


def convert_npz_dir_to_img_db(npz_dir: str, out_dir: str, conf_th: float = 0.2, max_bb: int = 100,
                              min_bb: int = 10, num_bb: int = 36, compressed: bool = False,
                              keep_all: bool = False) -> Dict[str, object]:
    """Write ``<out_dir>/<db dir name>`` (+ nbb json) from ``npz_dir/*.npz``.

    Returns ``{"db_path", "written", "skipped": [corrupt files]}``.
    """
    if not os.path.isdir(npz_dir):
        raise DataError(f"Feature directory not found: {npz_dir} (expected BUTD per-image .npz files)")
    files = sorted(glob.glob(os.path.join(npz_dir, "*.npz")))
    if not files:
        raise DataError(f"No .npz files in {npz_dir}")
    skipped: List[str] = []
    db_path = write_img_db(out_dir, _npz_records(files, skipped), compressed=compressed, conf_th=conf_th,
                           max_bb=max_bb, min_bb=min_bb, num_bb=num_bb, keep_all=keep_all)
    return {"db_path": db_path, "written": len(files) - len(skipped), "skipped": skipped}


def build_vqa_txt_db(questions_json: str, annotations_json: Optional[str], ans2label_json: str, vocab: str,
                     out_dir: str, lowercase: bool = False, tokenizer_name: str = "bert-base-cased",
                     img_key_format: str = "coco_{subtype}_{image_id:012d}.npz", soft_score: str = "butd") -> Dict[str, int]:
    """A VQA txt_db from the official JSON: examples ``{question_id, question, image_id, input_ids,
    img_fname[, answer_type, question_type, target]}`` keyed by question id; returns id2len."""
    label2ans = read_label2ans(ans2label_json)
    ans2label = {a: i for i, a in enumerate(label2ans)}
    tok = WordPieceTokenizer(vocab, lowercase=lowercase)
    qfile = read_json(questions_json)
    questions = qfile.get("questions")
    if not isinstance(questions, list):
        raise DataError(f"{questions_json} has no 'questions' list")
    anns = None
    if annotations_json:
        anns = {a["question_id"]: a for a in read_json(annotations_json).get("annotations", [])}
    ids = tok.encode_batch([q["question"] for q in questions])

    def examples():
        for q, input_ids in zip(questions, ids):
            ex = {"question_id": q["question_id"], "question": q["question"], "image_id": q["image_id"],
                  "input_ids": input_ids,
                  "img_fname": image_key(img_key_format, qfile.get("data_subtype"), q["image_id"], questions_json)}
            if anns is not None:
                ann = anns.get(q["question_id"])
                if ann is None:
                    raise DataError(f"Question {q['question_id']} has no annotation in {annotations_json}")
                ex["answer_type"] = ann.get("answer_type")
                ex["question_type"] = ann.get("question_type")
                ex["target"] = soft_target([a["answer"] for a in ann["answers"]], ans2label, soft_score)
            yield str(q["question_id"]), ex

    return write_txt_db(out_dir, examples(), tok.meta(tokenizer_name))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m villa_plugin.datasets.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    img = sub.add_parser(
        "img_db", help="BUTD .npz directory -> UNITER img_db",
        description="Write a UNITER img_db (an LMDB named feat_th{conf_th}_max{max_bb}_min{min_bb}, plus the nbb "
                    "side file) from a folder of per-image .npz files, keyed by file name. Each .npz holds "
                    "features [n, 2048], norm_bb [n, 6] = x1/W, y1/H, x2/W, y2/H, w/W, h/H, conf [n, 1] and "
                    "optionally soft_labels [n, 1601], rows sorted by conf descending (docs/own_data.md). "
                    "Files missing a field are skipped and counted. Images from scratch: mmf_extract.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    img.add_argument("npz_dir", help="folder of per-image .npz files (BUTD's generate_npz.py output or your own)")
    img.add_argument("out_dir", help="the image db directory to create, e.g. img_db/my_images")
    img.add_argument("--conf_th", type=float, default=0.2,
                     help="boxes kept per image: clamp(#(conf > conf_th), min_bb, max_bb); -1 = a fixed --num_bb")
    img.add_argument("--max_bb", type=int, default=100, help="most boxes per image")
    img.add_argument("--min_bb", type=int, default=10, help="fewest boxes per image (when it has that many)")
    img.add_argument("--num_bb", type=int, default=36, help="boxes per image when --conf_th -1 (db feat_numbb{N})")
    img.add_argument("--compress", action="store_true", help="store np.savez_compressed values (dir suffix _compressed)")
    img.add_argument("--keep_all", action="store_true", help="store every box (db dir 'all')")
    txt = sub.add_parser("vqa_txt_db", help="VQA v2 JSON -> UNITER txt_db")
    txt.add_argument("questions")
    txt.add_argument("out_dir")
    txt.add_argument("--annotations", default=None)
    txt.add_argument("--ans2label", required=True)
    txt.add_argument("--vocab", required=True)
    txt.add_argument("--lowercase", action="store_true")
    txt.add_argument("--tokenizer_name", default="bert-base-cased")
    txt.add_argument("--img_key_format", default="coco_{subtype}_{image_id:012d}.npz")
    txt.add_argument("--soft_score", default="butd", choices=["butd", "min3"])
    args = parser.parse_args(argv)
    if args.cmd == "img_db":
        conf_th = int(args.conf_th) if args.conf_th == -1 else args.conf_th
        out = convert_npz_dir_to_img_db(args.npz_dir, args.out_dir, conf_th, args.max_bb, args.min_bb,
                                        args.num_bb, args.compress, args.keep_all)
        print(json.dumps({k: (len(v) if k == "skipped" else v) for k, v in out.items()}))
    else:
        id2len = build_vqa_txt_db(args.questions, args.annotations, args.ans2label, args.vocab, args.out_dir,
                                  args.lowercase, args.tokenizer_name, args.img_key_format, args.soft_score)
        print(json.dumps({"txt_db": args.out_dir, "examples": len(id2len)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
