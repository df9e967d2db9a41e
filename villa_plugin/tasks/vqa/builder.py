"""Registered builder ``vqa2``: VQA v2 from UNITER's txt_db/img_db, or from VQA JSON + our img_db.

Sources (``source``):

- ``txt_db``: UNITER's released dbs. ``txt_db.<split>`` and ``img_db.<split>`` are paired lists
  (one img_db may serve every txt_db); targets are the stored ``target = {labels, scores}``.
- ``vqa_json``: the official VQA v2 question / annotation JSON, tokenised here with a local
  WordPiece ``vocab``; targets are soft scores over ``ans2label`` (``soft_score``: ``butd`` or
  ``min3``, see vqa_answers.py); each question's image key is ``img_key_format`` filled with the
  question file's ``data_subtype`` and the ``image_id`` (UNITER's naming,
  ``coco_train2014_000000000009.npz``), looked up in the split's ``img_db`` list.

``demo: true`` materialises the bundled demo (datasets/demo.py) under ``demo_dir`` and uses it
with source ``vqa_json``: its files, vocab and feature settings replace the configured ones.
Relative paths are relative to ``data_dir``. Training drops questions longer than ``max_txt_len``
tokens (counted, logged); val/test keep all.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.tasks.vqa.answers import SCORE_RULES, soft_target
from villa_plugin.tasks.vqa.dataset import VQADataset, read_label2ans
import villa_plugin.tasks.vqa.demo as vqa_demo
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.text import TxtDB, WordPieceTokenizer
from villa_plugin.datasets.task_builder import TaskBuilder
from villa_plugin.registry import registry

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
JSON_HINT = ("Download the VQA v2 questions/annotations from https://visualqa.org/download.html, or use "
             "dataset_config.vqa2.demo=true for the bundled demo.")


@registry.register_builder("vqa2")
class VQA2Builder(TaskBuilder):
    """Builds :class:`VQADataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = "vqa2"
    DEMO = vqa_demo

    def settings(self) -> Dict[str, Any]:
        """The effective config: the configured one, or with the demo's files when ``demo`` is on."""
        cfg = dict(self.cfg)
        if cfg.get("demo"):
            p = self.materialise_demo()
            cfg.update(
                source="vqa_json", data_dir=p["root"], vocab=p["vocab"], lowercase=p["lowercase"],
                ans2label=p["ans2label"], img_key_format=p["img_key_format"],
                questions={s: [v["questions"]] for s, v in p["splits"].items()},
                annotations={s: [v["annotations"]] if v["annotations"] else [] for s, v in p["splits"].items()},
                img_db={s: [v["img_db"]] for s, v in p["splits"].items()},
                **{k: p[k] for k in ("conf_th", "max_bb", "min_bb", "num_bb", "compressed")},
            )
        return cfg

    def _paths(self, cfg: Dict[str, Any], key: str, split: str) -> List[str]:
        per_split = cfg.get(key) or {}
        if not isinstance(per_split, dict):
            raise ConfigError(f"dataset_config.{self.dataset_name}.{key} must map split -> list of paths")
        value = per_split.get(split) or []
        value = [value] if isinstance(value, str) else list(value)
        return [_resolve(cfg, p) for p in value]

    def _img_dbs(self, cfg: Dict[str, Any], split: str) -> List[ImgFeatDB]:
        paths = self._paths(cfg, "img_db", split)
        if not paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.img_db.{split} lists no image dbs")
        kw = {k: cfg.get(k, d) for k, d in (("conf_th", 0.2), ("max_bb", 100), ("min_bb", 10), ("num_bb", 36))}
        return [ImgFeatDB(p, compressed=bool(cfg.get("compressed", False)), **kw) for p in paths]

    # -- datasets -------------------------------------------------------------------------------
    def build_dataset(self, split: str) -> VQADataset:
        if split not in SPLITS:
            raise ConfigError(f'vqa2 has splits {", ".join(SPLITS)}; got "{split}"')
        cfg = self.settings()
        label2ans = read_label2ans(_resolve(cfg, cfg.get("ans2label"), "ans2label"))
        num_answers = cfg.get("num_answers") or len(label2ans)
        if num_answers < len(label2ans):
            raise ConfigError(f"dataset_config.{self.dataset_name}.num_answers={num_answers} is smaller than the "
                              f"{len(label2ans)} answers in {cfg.get('ans2label')}")
        max_txt_len = int(cfg.get("max_txt_len", 60)) if split == "train" else -1
        source = cfg.get("source", "txt_db")
        common = dict(label2ans=label2ans, num_answers=int(num_answers),
                      lengths_include_cls_sep=bool(cfg.get("lengths_include_cls_sep", True)))
        if source == "txt_db":
            columns = self._from_txt_db(cfg, split, max_txt_len)
        elif source == "vqa_json":
            columns = self._from_json(cfg, split, max_txt_len, label2ans)
        else:
            raise ConfigError(f'dataset_config.{self.dataset_name}.source must be "txt_db" or "vqa_json", got "{source}"')
        if not columns["qids"]:
            raise DataError(f"vqa2 {split}: no questions left (files: {self._paths(cfg, 'txt_db' if source == 'txt_db' else 'questions', split)})")
        dataset = VQADataset(self.dataset_name, split, cfg, **columns, **common)
        logger.info("vqa2 %s: %d questions (%d dropped as longer than max_txt_len=%d)",
                    split, len(dataset), dataset.num_dropped, max_txt_len)
        return dataset

    def _from_txt_db(self, cfg: Dict[str, Any], split: str, max_txt_len: int) -> Dict[str, Any]:
        txt_paths = self._paths(cfg, "txt_db", split)
        if not txt_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.txt_db.{split} lists no txt_dbs")
        n_img = len(self._paths(cfg, "img_db", split))
        if n_img not in (1, len(txt_paths)):
            raise ConfigError(f"vqa2 {split}: {len(txt_paths)} txt_dbs need 1 or {len(txt_paths)} img_dbs "
                              f"(paired in order), got {n_img}")
        txt_dbs = [TxtDB(p, max_txt_len) for p in txt_paths]
        img_dbs = self._img_dbs(cfg, split)
        metas = {(str(t.meta.get("bert")), t.cls_, t.sep) for t in txt_dbs}
        if len(metas) > 1:
            raise DataError(f"vqa2 {split}: txt_dbs {txt_paths} were built with different tokenizers ({sorted(metas)}); "
                            f"all must share one vocabulary.")
        cols: Dict[str, List] = {k: [] for k in ("qids", "txt_lens", "img_keys", "img_db_index", "txt_keys", "txt_db_index")}
        for t_idx, tdb in enumerate(txt_dbs):
            i_idx = t_idx if len(img_dbs) > 1 else 0
            for key, tlen in tdb.id2len.items():
                img = tdb.txt2img.get(key) or tdb[key]["img_fname"]
                if img not in img_dbs[i_idx]:
                    raise DataError(f'Image "{img}" of question {key} (txt_db {tdb.db_dir}) is not in img_db '
                                    f"{img_dbs[i_idx].db_path}. Pair each txt_db with its img_db in the same order.")
                cols["qids"].append(int(key) if str(key).isdigit() else key)
                cols["txt_lens"].append(tlen)
                cols["img_keys"].append(img)
                cols["img_db_index"].append(i_idx)
                cols["txt_keys"].append(key)
                cols["txt_db_index"].append(t_idx)
        return dict(cols, img_dbs=img_dbs, txt_dbs=txt_dbs, cls_id=txt_dbs[0].cls_, sep_id=txt_dbs[0].sep,
                    num_dropped=sum(t.num_dropped for t in txt_dbs))

    def _from_json(self, cfg: Dict[str, Any], split: str, max_txt_len: int, label2ans: List[str]) -> Dict[str, Any]:
        q_paths = self._paths(cfg, "questions", split)
        a_paths = self._paths(cfg, "annotations", split)
        if not q_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.questions.{split} lists no question files")
        if a_paths and len(a_paths) != len(q_paths):
            raise ConfigError(f"vqa2 {split}: {len(q_paths)} question files but {len(a_paths)} annotation files "
                              f"(pair them in order, or list none for an unlabelled split)")
        rule = cfg.get("soft_score", "butd")
        if rule not in SCORE_RULES:
            raise ConfigError(f"dataset_config.{self.dataset_name}.soft_score must be one of {SCORE_RULES}, got {rule!r}")
        tok = WordPieceTokenizer(_resolve(cfg, cfg.get("vocab"), "vocab"), lowercase=bool(cfg.get("lowercase", False)))
        img_dbs = self._img_dbs(cfg, split)
        ans2label = {a: i for i, a in enumerate(label2ans)}
        key_format = str(cfg.get("img_key_format", "coco_{subtype}_{image_id:012d}.npz"))
        cols: Dict[str, List] = {k: [] for k in ("qids", "txt_lens", "img_keys", "img_db_index", "input_ids", "targets")}
        dropped = unanswerable = 0
        for f_idx, q_path in enumerate(q_paths):
            qfile = load_json(q_path, JSON_HINT)
            questions = qfile.get("questions")
            if not isinstance(questions, list):
                raise DataError(f"{q_path} has no 'questions' list; is it a VQA v2 question file?")
            answers = None
            if a_paths:
                anns = load_json(a_paths[f_idx], JSON_HINT).get("annotations")
                if not isinstance(anns, list):
                    raise DataError(f"{a_paths[f_idx]} has no 'annotations' list; is it a VQA v2 annotation file?")
                answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns}
            all_ids = tok.encode_batch([q["question"] for q in questions])
            for q, ids in zip(questions, all_ids):
                if 0 <= max_txt_len < len(ids):
                    dropped += 1
                    continue
                key = image_key(key_format, qfile.get("data_subtype"), q["image_id"], q_path)
                db_idx = next((i for i, db in enumerate(img_dbs) if key in db), None)
                if db_idx is None:
                    raise DataError(f'Image "{key}" of question {q["question_id"]} ({q_path}) is in none of the '
                                    f"img_dbs {[db.db_path for db in img_dbs]}. Check img_key_format and img_db.{split}.")
                target = None
                if answers is not None:
                    if q["question_id"] not in answers:
                        raise DataError(f'Question {q["question_id"]} of {q_path} has no annotation in {a_paths[f_idx]}')
                    target = soft_target(answers[q["question_id"]], ans2label, rule)
                    unanswerable += not target["labels"]
                cols["qids"].append(q["question_id"])
                cols["txt_lens"].append(len(ids))
                cols["img_keys"].append(key)
                cols["img_db_index"].append(db_idx)
                cols["input_ids"].append(ids)
                cols["targets"].append(target)
        if unanswerable:
            logger.info("vqa2 %s: %d questions have no answer in the vocabulary (all-zero targets)", split, unanswerable)
        if not a_paths:
            cols["targets"] = None
        return dict(cols, img_dbs=img_dbs, cls_id=tok.token_to_id("[CLS]"), sep_id=tok.token_to_id("[SEP]"),
                    num_dropped=dropped)


def _resolve(cfg: Dict[str, Any], path: Any, key: str = "") -> str:
    """``path`` made absolute against ``data_dir`` (``~`` expanded)."""
    if not path:
        raise ConfigError(f"dataset_config.vqa2.{key} is not set")
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(os.path.expanduser(str(cfg.get("data_dir") or "")), path)


def load_json(path: str, hint: str = "") -> Dict[str, Any]:
    """A JSON file, or DataError naming it (missing or invalid)."""
    if not os.path.isfile(path):
        raise DataError(f"File not found: {path}. {hint}")
    with open(path, "r", encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except ValueError as err:
            raise DataError(f"{path} is not valid JSON: {err}") from err


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
