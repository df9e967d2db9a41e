"""Registered builder ``vcr``: VCR from UNITER's txt_db + two img_dbs, or from VCR's JSON lines.

Sources (``source``):

- ``txt_db``: UNITER's ``txt_db/vcr_{train,val,test}.db`` (``input_ids`` of the question,
  ``input_ids_as`` / ``input_ids_rs`` of the 4 answers / rationales with the person/object tags
  already mapped to the 81 tag ids after the base vocabulary, ``qa_target``, ``qar_target``,
  ``img_fname`` = [gt-box key, detected-box key]; lengths from ``id2len_qar.json``).
- ``annotations``: VCR's ``{train,val,test}.jsonl`` (``question``, ``answer_choices``,
  ``rationale_choices`` as token lists where a list of ints is a person/object tag, ``objects``,
  ``answer_label``, ``rationale_label``, ``annot_id``, ``img_fn``). Words are WordPiece-tokenised
  with a local ``vocab``; object index i < 81 becomes tag id ``tag_token_base + i`` (null: the
  vocabulary size); higher indices become the object's class name (counted, logged). Image keys are
  ``gt_img_key_format`` / ``img_key_format`` filled with ``split`` (from the annot_id), ``img_fn``
  (its path with ``/`` -> ``_``, extension dropped), ``img_id`` and ``movie``.

Regions: the gt boxes (``img_db_gt``, read with ``gt_conf_th`` / ``gt_num_bb``, by default all boxes)
followed by the detected boxes (``img_db``); token length for bucketing ``text + nbb_gt + nbb_det``.

Rows (one per (question, candidate); ``vcr`` head, 2 logits each):

- Q->A: ``[CLS] q [SEP] a_j [SEP]``, type ids 0 on q, 2 from the first [SEP] on;
- QA->R: ``[CLS] q [SEP] a [SEP] r_k [SEP]``, type 2 on the answer, 3 on the rationale.

Training rows per question: the Q->A rows and the QA->R rows given the gt answer (``train_tasks``),
with binary ``targets`` per row. Evaluation: 4 + 4 rows (``qar_candidates: gt``) or, for the
leaderboard, 4 + 16 rows (``all``: the rationales after each of the 4 answers); ``auto`` = all for the
test split, gt otherwise. Batches carry ``qa_targets`` / ``qar_targets`` [questions] when labelled.
``run_type=predict`` writes the leaderboard CSV (annot_id, answer_0..3,
rationale_conditioned_on_a{i}_{j}: softmax over each group of 4 of the rows' ``logit[:, 1]``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
import villa_plugin.tasks.vcr.demo as vcr_demo
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.lmdb_utils import LazyLmdb
from villa_plugin.datasets.task_common import (
    ExampleFilter,
    candidate_rows,
    check_image,
    check_label,
    check_split,
    choice,
    collate_example_rows,
    open_img_db,
    read_json,
    read_jsonl,
    resolve_path,
    split_paths,
    unique_by,
    with_extension,
    write_csv_atomic,
)
from villa_plugin.datasets.text import TXT_DB_HINT, TxtDB, WordPieceTokenizer
from villa_plugin.datasets.task_builder import TaskBuilder
from villa_plugin.tasks.vcr.metrics import vcr_candidate_scores
from villa_plugin.tasks.vcr.head import VCR_NUM_SPECIAL_TOKENS
from villa_plugin.registry import registry

logger = logging.getLogger(__name__)

NAME = "vcr"
NUM_CHOICES = 4
ANNOTATION_HINT = ("Get VCR's vcr1annots/{train,val,test}.jsonl from https://visualcommonsense.com, or use "
                   "dataset_config.vcr.demo=true for the bundled demo.")
LABEL_FIX = f"VCR labels index the {NUM_CHOICES} choices (0-{NUM_CHOICES - 1}); fix or drop the example."
TASKS = ("qa", "qar")
CSV_HEADER = (["annot_id"] + [f"answer_{i}" for i in range(NUM_CHOICES)]
              + [f"rationale_conditioned_on_a{a}_{i}" for a in range(NUM_CHOICES) for i in range(NUM_CHOICES)])


class VcrTxtDB(TxtDB):
    """UNITER's VCR txt_db: a :class:`TxtDB` whose lengths come from ``id2len_qar.json`` (question +
    gt answer + rationale tokens), else ``id2len_qa.json``, else ``id2len.json``."""

    def __init__(self, db_dir: str):  # noqa: D401 - no call to TxtDB.__init__ (it needs id2len.json)
        self.db_dir = str(db_dir)
        if not os.path.isdir(self.db_dir):
            raise DataError(f"txt_db directory not found: {self.db_dir}. {TXT_DB_HINT}")
        self.meta = read_json(os.path.join(self.db_dir, "meta.json"), TXT_DB_HINT)
        for key in ("CLS", "SEP"):
            if key not in self.meta:
                raise DataError(f"{self.db_dir}/meta.json has no '{key}' id")
        names = ("id2len_qar.json", "id2len_qa.json", "id2len.json")
        found = next((n for n in names if os.path.isfile(os.path.join(self.db_dir, n))), None)
        if found is None:
            raise DataError(f"VCR txt_db {self.db_dir} has none of {list(names)}. {TXT_DB_HINT}")
        self.id2len = {k: int(v) for k, v in read_json(os.path.join(self.db_dir, found)).items()}
        self.num_dropped = 0
        t2i = os.path.join(self.db_dir, "txt2img.json")
        self.txt2img = read_json(t2i) if os.path.isfile(t2i) else {}
        self.db = LazyLmdb(self.db_dir, what="txt_db LMDB", how_to_get=TXT_DB_HINT)
        self.cls_, self.sep = int(self.meta["CLS"]), int(self.meta["SEP"])
        self.mask, self.v_range = self.meta.get("MASK"), self.meta.get("v_range")


def qar_length(q: Sequence[int], answers: Sequence[Sequence[int]], rationales: Sequence[Sequence[int]],
               qa_target: Optional[int]) -> int:
    """Text tokens of the longest QA->R row (gt answer when known): question + answer + rationale."""
    answer = len(answers[qa_target]) if qa_target is not None else max(len(a) for a in answers)
    return len(q) + answer + max(len(r) for r in rationales)


class VcrTokenizer:
    """VCR token lists -> ids: words through WordPiece, tags ``[i, j]`` -> ``tag_base + i`` (i < 81),
    else the object's class name (counted in ``fallbacks``)."""

    def __init__(self, tok: WordPieceTokenizer, tag_base: int):
        self.tok, self.tag_base = tok, int(tag_base)
        self.fallbacks = 0

    def __call__(self, tokens: Sequence[Any], objects: Sequence[str], where: str) -> List[int]:
        ids: List[int] = []
        words: List[str] = []

        def flush():
            if words:
                ids.extend(self.tok.encode(" ".join(words)))
                words.clear()

        for token in tokens:
            if isinstance(token, str):
                words.append(token)
                continue
            if not isinstance(token, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in token):
                raise DataError(f"{where}: token {token!r} is neither a word nor a list of object indices")
            flush()
            for index in token:
                if not 0 <= index < len(objects):
                    raise DataError(f"{where}: tag [{index}] refers to object {index}, but the example lists "
                                    f"{len(objects)} objects. Check the annotation file.")
                if index < VCR_NUM_SPECIAL_TOKENS:
                    ids.append(self.tag_base + index)
                else:  # no tag token left: the class name stands in
                    self.fallbacks += 1
                    ids.extend(self.tok.encode(str(objects[index])))
        flush()
        return ids


class VcrDataset(BaseDataset):
    """VCR questions; each item expands to its (question, candidate) rows (see the module docstring)."""

    def __init__(self, dataset_name: str, dataset_type: str, config: Any, *, annot_ids: List[str],
                 txt_lens: Sequence[int], img_keys: List[Tuple[str, str]], img_db_index: List[Tuple[int, int]],
                 img_dbs_gt: List[ImgFeatDB], img_dbs: List[ImgFeatDB], cls_id: int, sep_id: int,
                 qar_candidates: str, train_tasks: Sequence[str] = TASKS,
                 texts: Optional[List[Dict[str, Any]]] = None, txt_dbs: Optional[List[TxtDB]] = None,
                 txt_db_index: Optional[Sequence[int]] = None, labelled: bool = True, num_dropped: int = 0):
        super().__init__(dataset_name, dataset_type, config)
        self.annot_ids = annot_ids
        self.img_keys, self.img_db_index = img_keys, img_db_index
        self.img_dbs_gt, self.img_dbs = img_dbs_gt, img_dbs
        self.cls_id, self.sep_id = int(cls_id), int(sep_id)
        self.qar_candidates = qar_candidates
        self.train_tasks = tuple(train_tasks)
        self._texts, self._txt_dbs = texts, txt_dbs
        self._txt_db_index = None if txt_db_index is None else np.asarray(txt_db_index, dtype=np.int32)
        self.labelled = bool(labelled)
        self.num_dropped = int(num_dropped)
        nbbs = [img_dbs_gt[g].nbb(kg) + img_dbs[d].nbb(kd) for (g, d), (kg, kd) in zip(img_db_index, img_keys)]
        self._lengths = [int(t) + n for t, n in zip(txt_lens, nbbs)]

    def __len__(self) -> int:
        return len(self.annot_ids)

    def lengths(self) -> List[int]:
        """Tokens per question: QA->R text + gt boxes + detected boxes (UNITER's VCR length)."""
        return self._lengths

    @property
    def rows_per_question(self) -> int:
        if self.dataset_type == "train":
            return NUM_CHOICES * len(self.train_tasks)
        return NUM_CHOICES * (2 if self.qar_candidates == "gt" else 1 + NUM_CHOICES)

    def _text(self, i: int) -> Dict[str, Any]:
        if self._texts is not None:
            return self._texts[i]
        db = self._txt_dbs[self._txt_db_index[i]]
        ex = db[self.annot_ids[i]]
        where = f'txt_db {db.db_dir}, example "{self.annot_ids[i]}"'
        return _checked_text(ex.get("input_ids"), ex.get("input_ids_as"), ex.get("input_ids_rs"),
                             ex.get("qa_target"), ex.get("qar_target"), where)

    def _regions(self, i: int):
        (g, d), (key_gt, key_det) = self.img_db_index[i], self.img_keys[i]
        feat_gt, pos_gt = self.img_dbs_gt[g][key_gt]
        feat, pos = self.img_dbs[d][key_det]
        return torch.cat([feat_gt, feat], dim=0), torch.cat([pos_gt, pos], dim=0)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        text = self._text(i)
        feat, pos = self._regions(i)
        q, answers, rationales = text["q"], text["as"], text["rs"]
        qa_t, qar_t = text["qa_target"], text["qar_target"]
        annot_id = self.annot_ids[i]
        if self.dataset_type == "train":
            want_qa, qar_mode = "qa" in self.train_tasks, ("gt" if "qar" in self.train_tasks else None)
        else:
            want_qa, qar_mode = True, self.qar_candidates
        rows, row_targets = [], []
        if want_qa:
            rows += candidate_rows(self.cls_id, self.sep_id, [q], [0], answers, 2, feat, pos, annot_id)
            row_targets += [int(j == qa_t) for j in range(NUM_CHOICES)] if qa_t is not None else []
        if qar_mode == "gt":
            if qa_t is None:
                raise DataError(f"VCR example {annot_id} has no answer label, so its QA->R rows (given the gt "
                                f"answer) cannot be built: use qar_candidates=all for unlabelled splits.")
            rows += candidate_rows(self.cls_id, self.sep_id, [q, answers[qa_t]], [0, 2], rationales, 3, feat, pos, annot_id)
            row_targets += [int(k == qar_t) for k in range(NUM_CHOICES)] if qar_t is not None else []
        elif qar_mode == "all":
            for answer in answers:
                rows += candidate_rows(self.cls_id, self.sep_id, [q, answer], [0, 2], rationales, 3, feat, pos, annot_id)
        labelled = qa_t is not None and qar_t is not None and len(row_targets) == len(rows)
        return {"id": annot_id, "rows": rows, "row_targets": row_targets if labelled else None,
                "qa_target": qa_t, "qar_target": qar_t}

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        batch: Dict[str, Any] = {}
        if all(e["qa_target"] is not None and e["qar_target"] is not None for e in examples):
            batch["qa_targets"] = torch.as_tensor([e["qa_target"] for e in examples], dtype=torch.long)
            batch["qar_targets"] = torch.as_tensor([e["qar_target"] for e in examples], dtype=torch.long)
        batch.update(collate_example_rows(examples))
        if all(e["row_targets"] is not None for e in examples):
            batch["targets"] = torch.as_tensor([t for e in examples for t in e["row_targets"]], dtype=torch.long)
        batch["qids"] = [e["id"] for e in examples]
        batch["dataset_name"], batch["dataset_type"] = self.dataset_name, self.dataset_type
        return SampleList(batch)

    def format_predictions(self, batch: SampleList, output: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Per question: ``answer`` probabilities [4] and ``rationale`` probabilities [4 answers][4]
        (softmax over each group of the rows' ``logit[:, 1]``)."""
        if self.rows_per_question != NUM_CHOICES * (1 + NUM_CHOICES):
            raise ConfigError(
                f"VCR leaderboard predictions need the rationales after every answer: set "
                f"dataset_config.{self.dataset_name}.qar_candidates=all (now {self.qar_candidates})."
            )
        per_question = vcr_candidate_scores(output["scores"].detach().float(), len(batch["qids"])).cpu()
        answer = torch.softmax(per_question[:, :NUM_CHOICES], dim=-1)
        rationale = torch.softmax(per_question[:, NUM_CHOICES:].reshape(-1, NUM_CHOICES, NUM_CHOICES), dim=-1)
        return [{"annot_id": q, "answer": answer[n].tolist(), "rationale": rationale[n].tolist()}
                for n, q in enumerate(batch["qids"])]

    def write_predictions(self, records: List[Dict[str, Any]], path: str) -> str:
        """The VCR leaderboard CSV (header ``annot_id, answer_0..3, rationale_conditioned_on_a{i}_{j}``;
        rows in annot_id order; a default ``.json`` name becomes ``.csv``)."""
        records = sorted(unique_by(records, "annot_id"), key=lambda r: _annot_order(r["annot_id"]))
        rows = [[r["annot_id"], *r["answer"], *[p for group in r["rationale"] for p in group]] for r in records]
        return write_csv_atomic(CSV_HEADER, rows, with_extension(path, ".csv"))


def _annot_order(annot_id: str):
    tail = str(annot_id).rsplit("-", 1)[-1]
    return (0, int(tail), str(annot_id)) if tail.isdigit() else (1, 0, str(annot_id))


def _checked_text(q, answers, rationales, qa_t, qar_t, where: str) -> Dict[str, Any]:
    if q is None or answers is None or rationales is None:
        raise DataError(f"{where}: a VCR example needs input_ids, input_ids_as and input_ids_rs")
    if len(answers) != NUM_CHOICES or len(rationales) != NUM_CHOICES:
        raise DataError(f"{where}: {len(answers)} answers and {len(rationales)} rationales; VCR has {NUM_CHOICES} of each")
    qa_t = None if qa_t is None or qa_t < 0 else check_label(qa_t, NUM_CHOICES, f"{where} (answer)", LABEL_FIX)
    qar_t = None if qar_t is None or qar_t < 0 else check_label(qar_t, NUM_CHOICES, f"{where} (rationale)", LABEL_FIX)
    return {"q": list(q), "as": [list(a) for a in answers], "rs": [list(r) for r in rationales],
            "qa_target": qa_t, "qar_target": qar_t}


@registry.register_builder(NAME)
class VcrBuilder(TaskBuilder):
    """Builds :class:`VcrDataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = NAME
    DEMO = vcr_demo

    DEMO_PER_SPLIT = TaskBuilder.DEMO_PER_SPLIT + ("img_db_gt",)
    DEMO_FEATURE_KEYS = TaskBuilder.DEMO_FEATURE_KEYS + ("gt_conf_th", "gt_num_bb", "gt_min_bb")

    def demo_settings(self, paths: Dict[str, Any]) -> Dict[str, Any]:
        return dict(super().demo_settings(paths), tag_token_base=None, gt_img_key_format=paths["gt_img_key_format"])

    def build_dataset(self, split: str) -> VcrDataset:
        check_split(split, self.dataset_name)
        cfg = self.settings()
        source = choice(cfg, "source", ("txt_db", "annotations"), self.dataset_name, "txt_db")
        policy = choice(cfg, "missing_images", ("error", "skip"), self.dataset_name, "error")
        qar = choice(cfg, "qar_candidates", ("auto", "gt", "all"), self.dataset_name, "auto")
        qar = ("all" if split == "test" else "gt") if qar == "auto" else qar
        tasks = [str(t) for t in (cfg.get("train_tasks") or TASKS)]
        if not tasks or set(tasks) - set(TASKS):
            raise ConfigError(f"dataset_config.{self.dataset_name}.train_tasks must be a non-empty subset of {list(TASKS)}, got {tasks}")
        filt = ExampleFilter(self.dataset_name, split, int(cfg.get("max_txt_len", 220)), training=split == "train")
        gt_paths = split_paths(cfg, "img_db_gt", split, self.dataset_name)
        det_paths = split_paths(cfg, "img_db", split, self.dataset_name)
        if not gt_paths or not det_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.img_db_gt.{split} and img_db.{split} must each "
                              f"list an image db (VCR reads gt boxes and detected boxes)")
        img_dbs_gt = [open_img_db(p, cfg, prefix="gt_") for p in gt_paths]
        img_dbs = [open_img_db(p, cfg) for p in det_paths]
        dbs = (img_dbs_gt, img_dbs)
        if source == "txt_db":
            columns = self._from_txt_db(cfg, split, dbs, filt, policy)
        else:
            columns = self._from_annotations(cfg, split, dbs, filt, policy)
        if not columns["annot_ids"]:
            raise DataError(f"{self.dataset_name} {split}: no examples left ({dict(filt.dropped)} dropped)")
        if split == "train" and not columns["labelled"]:
            raise DataError(f"{self.dataset_name} train: examples without answer/rationale labels cannot be trained on")
        filt.log(len(columns["annot_ids"]))
        return VcrDataset(self.dataset_name, split, cfg, img_dbs_gt=img_dbs_gt, img_dbs=img_dbs,
                          qar_candidates=qar, train_tasks=tasks, num_dropped=filt.num_dropped, **columns)

    def _locate(self, keys: Tuple[str, str], dbs, where: str, filt: ExampleFilter, policy: str):
        located = []
        for key, img_dbs in zip(keys, dbs):
            index = check_image(img_dbs, key, where, filt, policy)
            if index is None:
                return None
            located.append(index)
        return tuple(located)

    def _from_txt_db(self, cfg, split, dbs, filt, policy) -> Dict[str, Any]:
        txt_paths = split_paths(cfg, "txt_db", split, self.dataset_name)
        if not txt_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.txt_db.{split} lists no txt_dbs")
        txt_dbs = [VcrTxtDB(p) for p in txt_paths]
        cols: Dict[str, List] = {k: [] for k in ("annot_ids", "txt_lens", "img_keys", "img_db_index", "txt_db_index")}
        labelled = False
        for t_idx, tdb in enumerate(txt_dbs):
            for key, tlen in tdb.id2len.items():
                where = f'txt_db {tdb.db_dir}, example "{key}"'
                if filt.over_limit(tlen):
                    continue
                fnames = tdb.txt2img.get(key) or tdb[key]["img_fname"]
                if isinstance(fnames, str) or len(fnames) != 2:
                    raise DataError(f"{where}: img_fname must be [gt-box key, detected-box key], got {fnames!r}")
                located = self._locate(tuple(fnames), dbs, where, filt, policy)
                if located is None:
                    continue
                if not cols["annot_ids"]:  # labels are checked per item; the first example tells the split's kind
                    first = tdb[key]
                    labelled = first.get("qa_target") is not None and first["qa_target"] >= 0
                for column, value in (("annot_ids", str(key)), ("txt_lens", int(tlen)), ("img_keys", tuple(fnames)),
                                      ("img_db_index", located), ("txt_db_index", t_idx)):
                    cols[column].append(value)
        return dict(cols, txt_dbs=txt_dbs, cls_id=txt_dbs[0].cls_, sep_id=txt_dbs[0].sep, labelled=labelled)

    def _from_annotations(self, cfg, split, dbs, filt, policy) -> Dict[str, Any]:
        ann_paths = split_paths(cfg, "annotations", split, self.dataset_name)
        if not ann_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.annotations.{split} lists no annotation files")
        tok = WordPieceTokenizer(resolve_path(cfg, cfg.get("vocab"), self.dataset_name, "vocab"),
                                 lowercase=bool(cfg.get("lowercase", False)))
        base = cfg.get("tag_token_base")
        vcr_tok = VcrTokenizer(tok, tok.vocab_size if base is None else int(base))
        formats = (str(cfg.get("gt_img_key_format", "vcr_gt_{split}_{img_fn}.npz")),
                   str(cfg.get("img_key_format", "vcr_{split}_{img_fn}.npz")))
        cols: Dict[str, List] = {k: [] for k in ("annot_ids", "txt_lens", "img_keys", "img_db_index", "texts")}
        for path in ann_paths:
            for number, ann in read_jsonl(path, ANNOTATION_HINT):
                fields = ("annot_id", "question", "answer_choices", "rationale_choices", "objects", "img_fn")
                missing = [f for f in fields if f not in ann]
                if missing:
                    raise DataError(f"{path}, line {number}: a VCR example needs {missing}. {ANNOTATION_HINT}")
                where = f"{path}, line {number} ({ann['annot_id']})"
                objects = ann["objects"]
                text = _checked_text(
                    vcr_tok(ann["question"], objects, where),
                    [vcr_tok(a, objects, where) for a in ann["answer_choices"]],
                    [vcr_tok(r, objects, where) for r in ann["rationale_choices"]],
                    ann.get("answer_label"), ann.get("rationale_label"), where,
                )
                if filt.over_limit(qar_length(text["q"], text["as"], text["rs"], text["qa_target"])):
                    continue
                keys = tuple(image_key(f, ann, where) for f in formats)
                located = self._locate(keys, dbs, where, filt, policy)
                if located is None:
                    continue
                length = qar_length(text["q"], text["as"], text["rs"], text["qa_target"])
                for column, value in (("annot_ids", str(ann["annot_id"])), ("txt_lens", length), ("img_keys", keys),
                                      ("img_db_index", located), ("texts", text)):
                    cols[column].append(value)
        if vcr_tok.fallbacks:
            logger.warning("vcr %s: %d tags referred to objects beyond the %d tag tokens; their class names were used",
                           split, vcr_tok.fallbacks, VCR_NUM_SPECIAL_TOKENS)
        labelled = all(t["qa_target"] is not None and t["qar_target"] is not None for t in cols["texts"])
        return dict(cols, cls_id=tok.token_to_id("[CLS]"), sep_id=tok.token_to_id("[SEP]"), labelled=labelled)


def image_key(key_format: str, ann: Dict[str, Any], where: str) -> str:
    """A VCR image's img_db key from ``key_format`` and the annotation (see the module docstring)."""
    img_fn = os.path.splitext(str(ann["img_fn"]))[0].replace("/", "_")
    split = str(ann["annot_id"]).split("-", 1)[0]
    try:
        return key_format.format(split=split, img_fn=img_fn, img_id=ann.get("img_id", ""), movie=ann.get("movie", ""))
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"dataset_config.vcr image key format {key_format!r} cannot name the image of {where}: "
                          f"{err}. Use the fields {{split}}, {{img_fn}}, {{img_id}}, {{movie}}.") from err


__all__ = ["VcrBuilder", "VcrDataset", "VcrTxtDB", "VcrTokenizer", "CSV_HEADER", "qar_length"]
