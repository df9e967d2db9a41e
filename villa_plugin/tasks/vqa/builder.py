"""Registered builder ``vqa2``: VQA v2 from UNITER's txt_db/img_db, or from VQA JSON + our img_db.

Sources (``source``):

- ``txt_db``: UNITER's released dbs. ``txt_db.<split>`` and ``img_db.<split>`` are paired lists
  (one img_db may serve every txt_db); targets are the stored ``target = {labels, scores}``.
- ``vqa_json``: the official VQA v2 question / annotation JSON, tokenised here with a local
  WordPiece ``vocab``; targets are soft scores over ``ans2label`` (``soft_score``: ``butd`` or
  ``min3``, see vqa_answers.py); each question's image key is ``img_key_format`` filled with the
  question file's ``data_subtype`` and the ``image_id`` (UNITER's naming,
  ``coco_train2014_000000000009.npz``), looked up in the split's ``img_db`` list.
- ``lxmert_json``: LXMERT's processed records (airsplay/lxmert ``data/vqa/{train,nominival,minival,
  test}.json``), lists of ``{"question_id", "img_id", "sent", "label": {answer: score}}`` (``label``
  absent in test) named by ``lxmert_json.<split>``; the scores are taken as given, answers outside
  ``ans2label`` (LXMERT's ``trainval_ans2label.json``) are dropped from the target (counted, logged).
  Each image key is ``img_key_format`` filled with ``img_id`` (e.g. ``"{img_id}"``). LXMERT's recipe
  is ``train: [vqa/train.json, vqa/nominival.json]``, ``val: [vqa/minival.json]``. GQA reuses this reader.

``demo: true`` materialises the bundled demo (tasks/vqa/demo.py) under ``demo_dir`` and uses it
with source ``vqa_json``: its files, vocab and feature settings replace the configured ones.
Relative paths are relative to ``data_dir``. Training drops questions longer than ``max_txt_len``
tokens (counted, logged); val/test keep all.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Tuple

import villa_plugin.tasks.vqa.demo as vqa_demo
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.common.input_spec import InputSpec, Size
from villa_plugin.datasets.task_builder import ExampleRecords, SplitContext, TaskBuilder
from villa_plugin.datasets.task_common import read_json, read_lxmert_records, resolve_path, split_paths
from villa_plugin.registry import registry
from villa_plugin.tasks.vqa.answers import SCORE_RULES, soft_target
from villa_plugin.tasks.vqa.dataset import VQADataset, read_label2ans

logger = logging.getLogger(__name__)

JSON_HINT = ("Download the VQA v2 questions/annotations from https://visualqa.org/download.html, or use "
             "dataset_config.vqa2.demo=true for the bundled demo.")


@registry.register_builder("vqa2")
class VQA2Builder(TaskBuilder):
    """Builds :class:`VQADataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = "vqa2"
    DEMO = vqa_demo
    SOURCES = ("txt_db", "vqa_json", "lxmert_json")
    LXMERT_JSON_KEY = "lxmert_json"   # the split lists of source lxmert_json
    LXMERT_JSON_HINT = ("Get LXMERT's processed VQA files (data/vqa/*.json of airsplay/lxmert), or use "
                        "dataset_config.vqa2.demo=true for the bundled demo.")

    def demo_settings(self, p: Dict[str, Any]) -> Dict[str, Any]:
        """The demo's files, read with source ``vqa_json`` (its test split has no annotations)."""
        return dict(
            source="vqa_json", data_dir=p["root"], vocab=p["vocab"], lowercase=p["lowercase"],
            ans2label=p["ans2label"], img_key_format=p["img_key_format"],
            questions={s: [v["questions"]] for s, v in p["splits"].items()},
            annotations={s: [v["annotations"]] if v["annotations"] else [] for s, v in p["splits"].items()},
            img_db={s: [v["img_db"]] for s, v in p["splits"].items()},
            **{k: p[k] for k in self.DEMO_FEATURE_KEYS},
        )

    def answer_vocabulary(self, cfg: Dict[str, Any]) -> Tuple[List[str], int]:
        """``(label2ans, num_answers)``: the answers of ``ans2label`` and the head width."""
        label2ans = read_label2ans(resolve_path(cfg, cfg.get("ans2label"), self.dataset_name, "ans2label"))
        num_answers = cfg.get("num_answers")
        if num_answers is None:
            return label2ans, len(label2ans)
        key = f"dataset_config.{self.dataset_name}.num_answers"
        if isinstance(num_answers, bool) or not isinstance(num_answers, int):
            raise ConfigError(f"{key} must be an integer or null (the number of answers in ans2label), got {num_answers!r}")
        if num_answers < len(label2ans):
            raise ConfigError(f"{key}={num_answers} is smaller than the {len(label2ans)} answers in "
                              f"{cfg.get('ans2label')}; set it to null to use their number")
        return label2ans, num_answers

    def input_spec(self, ctx: SplitContext, records: ExampleRecords) -> InputSpec:
        """The common sizes plus the targets' width (``num_answers``; null: the answers of ``ans2label``)."""
        spec = super().input_spec(ctx, records)
        key = f"dataset_config.{self.dataset_name}.num_answers"
        detail = "" if ctx.cfg.get("num_answers") is not None else f"null: the answers of {ctx.cfg.get('ans2label')}"
        return dataclasses.replace(spec, label_width=Size(ctx.extra["num_answers"], key, detail))

    def open_split(self, cfg: Dict[str, Any], split: str) -> SplitContext:
        label2ans, num_answers = self.answer_vocabulary(cfg)  # first: the file every source needs
        ctx = super().open_split(cfg, split)
        ctx.extra.update(label2ans=label2ans, num_answers=num_answers)
        return ctx

    def make_dataset(self, ctx: SplitContext, records: ExampleRecords) -> VQADataset:
        return VQADataset(self.dataset_name, ctx.split, ctx.cfg, records, ctx.img_dbs, label2ans=ctx.extra["label2ans"],
                          num_answers=ctx.extra["num_answers"], num_dropped=ctx.filt.num_dropped,
                          lengths_include_cls_sep=bool(ctx.cfg.get("lengths_include_cls_sep", True)))

    def read_txt_db(self, ctx: SplitContext) -> ExampleRecords:
        """UNITER's txt_dbs, ``txt_db[i]`` paired with ``img_db[i]`` (or every one with a single img_db)."""
        txt_dbs = self.open_txt_dbs(ctx)
        metas = {(str(t.meta.get("bert")), t.cls_, t.sep) for t in txt_dbs}
        if len(metas) > 1:
            raise DataError(f"vqa2 {ctx.split}: txt_dbs {[t.db_dir for t in txt_dbs]} were built with different "
                            f"tokenizers ({sorted(metas)}); all must share one vocabulary.")
        records = ExampleRecords.for_txt_dbs(txt_dbs)
        for ex, img, pair in self.paired_txt_db_examples(ctx, txt_dbs):
            qid = int(ex.key) if str(ex.key).isdigit() else ex.key
            records.add(qid, ex.length, img, pair, txt=ex)
        return records

    def read_vqa_json(self, ctx: SplitContext) -> ExampleRecords:
        """VQA v2 question / annotation JSON, tokenised here; soft-score targets over ``ans2label``."""
        q_paths = ctx.paths("questions", "question files")
        a_paths = self._annotation_paths(ctx, len(q_paths))
        rule = ctx.cfg.get("soft_score", "butd")
        if rule not in SCORE_RULES:
            raise ConfigError(f"dataset_config.{self.dataset_name}.soft_score must be one of {SCORE_RULES}, got {rule!r}")
        tok = ctx.tokenizer()
        ans2label = {a: i for i, a in enumerate(ctx.extra["label2ans"])}
        key_format = str(ctx.cfg.get("img_key_format", "coco_{subtype}_{image_id:012d}.npz"))
        records = ExampleRecords.in_memory(tok)
        unanswerable = 0
        for f_idx, q_path in enumerate(q_paths):
            qfile = read_json(q_path, JSON_HINT)
            questions = qfile.get("questions")
            if not isinstance(questions, list):
                raise DataError(f"{q_path} has no 'questions' list; is it a VQA v2 question file?")
            answers = self._answers(a_paths[f_idx]) if a_paths else None
            for q, ids in zip(questions, tok.encode_batch([q["question"] for q in questions])):
                if ctx.filt.over_limit(len(ids)):
                    continue
                where = f"{q_path}, question {q['question_id']}"
                key = image_key(key_format, qfile.get("data_subtype"), q["image_id"], q_path)
                located = ctx.locate([key], where)
                if located is None:
                    continue
                target = None
                if answers is not None:
                    if q["question_id"] not in answers:
                        raise DataError(f'Question {q["question_id"]} of {q_path} has no annotation in {a_paths[f_idx]}')
                    target = soft_target(answers[q["question_id"]], ans2label, rule)
                    unanswerable += not target["labels"]
                records.add(q["question_id"], len(ids), key, located[0], input_ids=ids, target=target)
        if unanswerable:
            logger.info("vqa2 %s: %d questions have no answer in the vocabulary (all-zero targets)", ctx.split, unanswerable)
        if not a_paths:
            records.targets = None
        return records

    def lxmert_question_id(self, value: Any) -> Any:
        """A record's question id as the dataset keeps it (VQA: as in the file, an int)."""
        return value

    def read_lxmert_json(self, ctx: SplitContext) -> ExampleRecords:
        """LXMERT's records (see the module docstring); targets when every record has a ``label``."""
        tok = ctx.tokenizer()
        ans2label = {a: i for i, a in enumerate(ctx.extra["label2ans"])}
        key_format = str(ctx.cfg.get("img_key_format", "{img_id}"))
        records = ExampleRecords.in_memory(tok)
        out_of_vocabulary = 0
        for path in ctx.paths(self.LXMERT_JSON_KEY, f"LXMERT {self.dataset_name} JSON files"):
            items = read_lxmert_records(path, LXMERT_QA_FIELDS, self.dataset_name.upper(), self.LXMERT_JSON_HINT)
            for n, item in enumerate(items):
                if "label" in item and not _is_score_dict(item["label"]):
                    raise DataError(f"{path}, record {n} (question {item['question_id']}): label must be "
                                    f"{{answer: score}}, got {item['label']!r}. {self.LXMERT_JSON_HINT}")
            for item, ids in zip(items, tok.encode_batch([item["sent"] for item in items])):
                if ctx.filt.over_limit(len(ids)):
                    continue
                key = lxmert_image_key(key_format, item["img_id"], path)
                located = ctx.locate([key], f"{path}, question {item['question_id']}")
                if located is None:
                    continue
                target = None
                if "label" in item:
                    pairs = sorted((ans2label[a], float(s)) for a, s in item["label"].items() if a in ans2label)
                    out_of_vocabulary += len(item["label"]) - len(pairs)
                    target = {"labels": [p[0] for p in pairs], "scores": [p[1] for p in pairs]}
                records.add(self.lxmert_question_id(item["question_id"]), len(ids), key, located[0],
                            input_ids=ids, target=target)
        if out_of_vocabulary:
            logger.info("%s %s: %d labels outside the answer vocabulary dropped from the targets", self.dataset_name,
                        ctx.split, out_of_vocabulary)
        return records.drop_absent_targets()

    def _annotation_paths(self, ctx: SplitContext, num_question_files: int) -> List[str]:
        a_paths = split_paths(ctx.cfg, "annotations", ctx.split, self.dataset_name)
        if a_paths and len(a_paths) != num_question_files:
            raise ConfigError(f"vqa2 {ctx.split}: {num_question_files} question files but {len(a_paths)} annotation "
                              f"files (pair them in order, or list none for an unlabelled split)")
        return a_paths

    @staticmethod
    def _answers(path: str) -> Dict[Any, List[str]]:
        anns = read_json(path, JSON_HINT).get("annotations")
        if not isinstance(anns, list):
            raise DataError(f"{path} has no 'annotations' list; is it a VQA v2 annotation file?")
        return {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns}


LXMERT_QA_FIELDS = ("question_id", "img_id", "sent")


def _is_score_dict(label: Any) -> bool:
    return isinstance(label, dict) and all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                           for s in label.values())


def lxmert_image_key(key_format: str, img_id: Any, source: str) -> str:
    """The img_db key of an LXMERT record's image (``img_key_format`` with the field ``{img_id}``)."""
    try:
        return key_format.format(img_id=img_id)
    except (KeyError, ValueError, IndexError) as err:
        raise ConfigError(f"img_key_format {key_format!r} cannot name image {img_id!r} of {source}: {err}. "
                          f"LXMERT's records name images by {{img_id}}, e.g. img_key_format: \"{{img_id}}\".") from err


def image_key(key_format: str, subtype: Optional[str], image_id: int, source: str = "") -> str:
    """The img_db key of an image, e.g. ``coco_train2014_000000000009.npz``."""
    if subtype is None and "{subtype" in key_format:
        raise DataError(f"{source} has no 'data_subtype' to name its images with img_key_format {key_format!r}; "
                        f"add it to the file or use a format without {{subtype}}.")
    try:
        return key_format.format(subtype=subtype, image_id=int(image_id))
    except (KeyError, ValueError, IndexError) as err:
        raise ConfigError(f"img_key_format {key_format!r} cannot name image {image_id} of {source}: {err}. "
                          f"Use the fields {{subtype}} and {{image_id}}.") from err
