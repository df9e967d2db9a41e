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
from typing import Any, Dict, List, Optional, Sequence

import villa_plugin.tasks.vcr.demo as vcr_demo
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.lmdb_utils import LazyLmdb
from villa_plugin.datasets.task_builder import SplitContext, TaskBuilder
from villa_plugin.datasets.task_common import choice, open_img_db, read_json, read_jsonl, split_paths
from villa_plugin.datasets.text import TXT_DB_HINT, TxtDB, WordPieceTokenizer
from villa_plugin.registry import registry
from villa_plugin.tasks.vcr.dataset import TASKS, VcrDataset, VcrRecords, _checked_text
from villa_plugin.tasks.vcr.head import VCR_NUM_SPECIAL_TOKENS

logger = logging.getLogger(__name__)

NAME = "vcr"
ANNOTATION_HINT = ("Get VCR's vcr1annots/{train,val,test}.jsonl from https://visualcommonsense.com, or use "
                   "dataset_config.vcr.demo=true for the bundled demo.")


class VcrTxtDB(TxtDB):
    """UNITER's VCR txt_db: a :class:`TxtDB` whose lengths come from ``id2len_qar.json`` (question +
    gt answer + rationale tokens), else ``id2len_qa.json``, else ``id2len.json``."""

    def __init__(self, db_dir: str, max_txt_len: int = -1):  # noqa: D401 - no TxtDB.__init__ (it needs id2len.json)
        if max_txt_len is not None and max_txt_len >= 0:
            raise ValueError("VcrTxtDB keeps every example; the builder applies max_txt_len (counted)")
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


@registry.register_builder(NAME)
class VcrBuilder(TaskBuilder):
    """Builds :class:`VcrDataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = NAME
    DEMO = vcr_demo
    DEFAULT_MAX_TXT_LEN = 220

    DEMO_PER_SPLIT = TaskBuilder.DEMO_PER_SPLIT + ("img_db_gt",)
    DEMO_FEATURE_KEYS = TaskBuilder.DEMO_FEATURE_KEYS + ("gt_conf_th", "gt_num_bb", "gt_min_bb")

    def demo_settings(self, paths: Dict[str, Any]) -> Dict[str, Any]:
        return dict(super().demo_settings(paths), tag_token_base=None, gt_img_key_format=paths["gt_img_key_format"])

    def open_split(self, cfg: Dict[str, Any], split: str) -> SplitContext:
        """Also: ``qar_candidates`` / ``train_tasks`` checked, the gt-box dbs opened (``extra``)."""
        qar = choice(cfg, "qar_candidates", ("auto", "gt", "all"), self.dataset_name, "auto")
        tasks = [str(t) for t in (cfg.get("train_tasks") or TASKS)]
        if not tasks or set(tasks) - set(TASKS):
            raise ConfigError(f"dataset_config.{self.dataset_name}.train_tasks must be a non-empty subset of {list(TASKS)}, got {tasks}")
        ctx = super().open_split(cfg, split)
        ctx.extra.update(qar_candidates=("all" if split == "test" else "gt") if qar == "auto" else qar, train_tasks=tasks,
                         img_dbs_gt=[open_img_db(p, cfg, prefix="gt_") for p in ctx.paths("img_db_gt", "image dbs")])
        return ctx

    def open_image_dbs(self, cfg: Dict[str, Any], split: str):
        if not split_paths(cfg, "img_db_gt", split, self.dataset_name) or not split_paths(cfg, "img_db", split, self.dataset_name):
            raise ConfigError(f"dataset_config.{self.dataset_name}.img_db_gt.{split} and img_db.{split} must each "
                              f"list an image db (VCR reads gt boxes and detected boxes)")
        return super().open_image_dbs(cfg, split)

    def make_dataset(self, ctx: SplitContext, records: VcrRecords) -> VcrDataset:
        if ctx.training and not records.labelled:
            raise DataError(f"{self.dataset_name} train: examples without answer/rationale labels cannot be trained on")
        return VcrDataset(self.dataset_name, ctx.split, ctx.cfg, records, img_dbs_gt=ctx.extra["img_dbs_gt"],
                          img_dbs=ctx.img_dbs, qar_candidates=ctx.extra["qar_candidates"],
                          train_tasks=ctx.extra["train_tasks"], num_dropped=ctx.filt.num_dropped)

    def read_txt_db(self, ctx: SplitContext) -> VcrRecords:
        txt_dbs = self.open_txt_dbs(ctx, VcrTxtDB)
        records = VcrRecords.for_txt_dbs(txt_dbs, labelled=False)
        dbs = (ctx.extra["img_dbs_gt"], ctx.img_dbs)
        for ex in self.txt_db_examples(ctx, txt_dbs):
            fnames = ex.img_fname()
            if isinstance(fnames, str) or len(fnames) != 2:
                raise DataError(f"{ex.where}: img_fname must be [gt-box key, detected-box key], got {fnames!r}")
            located = ctx.locate(fnames, ex.where, dbs=dbs)
            if located is None:
                continue
            if not records:  # labels are checked per item; the first example tells the split's kind
                first = txt_dbs[ex.db_index][ex.key]
                records.labelled = first.get("qa_target") is not None and first["qa_target"] >= 0
            records.add(str(ex.key), ex.length, tuple(fnames), tuple(located), txt=ex)
        return records

    def read_annotations(self, ctx: SplitContext) -> VcrRecords:
        tok = ctx.tokenizer()
        base = ctx.cfg.get("tag_token_base")
        vcr_tok = VcrTokenizer(tok, tok.vocab_size if base is None else int(base))
        formats = (str(ctx.cfg.get("gt_img_key_format", "vcr_gt_{split}_{img_fn}.npz")),
                   str(ctx.cfg.get("img_key_format", "vcr_{split}_{img_fn}.npz")))
        records = VcrRecords(cls_id=tok.token_to_id("[CLS]"), sep_id=tok.token_to_id("[SEP]"), texts=[])
        dbs = (ctx.extra["img_dbs_gt"], ctx.img_dbs)
        for path in ctx.paths("annotations", "annotation files"):
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
                length = qar_length(text["q"], text["as"], text["rs"], text["qa_target"])
                if ctx.filt.over_limit(length):
                    continue
                keys = tuple(image_key(f, ann, where) for f in formats)
                located = ctx.locate(keys, where, dbs=dbs)
                if located is not None:
                    records.add_text(str(ann["annot_id"]), length, keys, located, text)
        if vcr_tok.fallbacks:
            logger.warning("vcr %s: %d tags referred to objects beyond the %d tag tokens; their class names were used",
                           ctx.split, vcr_tok.fallbacks, VCR_NUM_SPECIAL_TOKENS)
        records.labelled = all(t["qa_target"] is not None and t["qar_target"] is not None for t in records.texts)
        return records


def image_key(key_format: str, ann: Dict[str, Any], where: str) -> str:
    """A VCR image's img_db key from ``key_format`` and the annotation (see the module docstring)."""
    img_fn = os.path.splitext(str(ann["img_fn"]))[0].replace("/", "_")
    split = str(ann["annot_id"]).split("-", 1)[0]
    try:
        return key_format.format(split=split, img_fn=img_fn, img_id=ann.get("img_id", ""), movie=ann.get("movie", ""))
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"dataset_config.vcr image key format {key_format!r} cannot name the image of {where}: "
                          f"{err}. Use the fields {{split}}, {{img_fn}}, {{img_id}}, {{movie}}.") from err


__all__ = ["VcrBuilder", "VcrTxtDB", "VcrTokenizer", "image_key", "qar_length"]
