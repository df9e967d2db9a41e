"""Registered builder ``visual_entailment``: SNLI-VE from UNITER's txt_db/img_db or SNLI-VE's JSON lines.

Sources (``source``):

- ``txt_db``: UNITER's ``txt_db/ve_{train,dev,test}.db`` (``input_ids`` of the hypothesis,
  ``img_fname``, ``target`` = ``{labels: [l], scores: [1.0]}`` or a bare label id) with the
  ``img_db/flickr30k`` features.
- ``annotations``: SNLI-VE's ``snli_ve_{train,dev,test}.jsonl`` (``Flikr30kID``, ``sentence2``,
  ``gold_label``, ``pairID``), the hypothesis tokenised with a local WordPiece ``vocab``; the image
  key is ``img_key_format`` filled with the numeric Flickr30k id (UNITER: ``flickr30k_{id:012d}.npz``).

Labels 0 contradiction, 1 entailment, 2 neutral (UNITER's ids); ``targets`` are one-hot ``[B, 3]``
rows for the ``logit_bce`` loss (BCE × 3, as the reference) and the ``accuracy`` metric. A label
outside these is an error naming the file and example. Training drops hypotheses longer than
``max_txt_len`` (evaluation keeps them; both counted and logged). ``run_type=predict`` writes a
JSON list ``[{"pair_id": str, "label": "entailment" | ...}]``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.tasks.vqa.dataset import VQADataset
import villa_plugin.tasks.visual_entailment.demo as ve_demo
from villa_plugin.datasets.task_common import (
    check_image,
    check_label,
    read_jsonl,
    resolve_path,
    split_paths,
    unique_by,
    write_json_atomic,
)
from villa_plugin.datasets.text import TxtDB, WordPieceTokenizer
from villa_plugin.datasets.task_builder import TaskBuilder
from villa_plugin.tasks.visual_entailment.head import VE_LABELS
from villa_plugin.registry import registry

logger = logging.getLogger(__name__)

NAME = "visual_entailment"
ANNOTATION_HINT = ("Get snli_ve_{train,dev,test}.jsonl from https://github.com/necla-ml/SNLI-VE, or use "
                   "dataset_config.visual_entailment.demo=true for the bundled demo.")
LABEL_FIX = f"SNLI-VE labels are {list(VE_LABELS)} (ids 0-2); fix or drop the example."


def ve_target(value: Any, where: str) -> Optional[Dict[str, List]]:
    """A txt_db / annotation label as VQA-style ``{labels, scores}`` (None when unlabelled)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in VE_LABELS:
            raise DataError(f"{where}: gold_label {value!r} is outside the head's range {list(VE_LABELS)}. {LABEL_FIX}")
        return {"labels": [VE_LABELS.index(value)], "scores": [1.0]}
    if isinstance(value, dict):
        labels = list(value.get("labels") or [])
        for label in labels:
            check_label(label, len(VE_LABELS), where, LABEL_FIX)
        return {"labels": labels, "scores": list(value.get("scores") or [1.0] * len(labels))}
    return {"labels": [check_label(value, len(VE_LABELS), where, LABEL_FIX)], "scores": [1.0]}


class VEDataset(VQADataset):
    """SNLI-VE split: VQA's dataset with 3 labels, label checks and SNLI-VE's prediction format."""

    def _text(self, i: int):
        if self._input_ids is not None:
            return super()._text(i)
        db = self._txt_dbs[self._txt_db_index[i]]
        example = db[self._txt_keys[i]]
        where = f'txt_db {db.db_dir}, example "{self._txt_keys[i]}"'
        target = example.get("target")
        return example["input_ids"], ve_target(target if target is not None else example.get("gold_label"), where)

    def format_predictions(self, batch: SampleList, output: Dict[str, Any]) -> List[Dict[str, Any]]:
        """``[{"pair_id": str, "label": str}]``: the arg-max of the 3 logits."""
        best = output["scores"].detach().argmax(dim=-1).cpu().tolist()
        return [{"pair_id": str(q), "label": self.label2ans[b]} for q, b in zip(batch["qids"], best)]

    def write_predictions(self, records: List[Dict[str, Any]], path: str) -> str:
        """A JSON list ``[{"pair_id", "label"}]`` (one per pair, first kept)."""
        rows = [{"pair_id": r["pair_id"], "label": r["label"]} for r in unique_by(records, "pair_id")]
        return write_json_atomic(rows, path)


@registry.register_builder(NAME)
class VEBuilder(TaskBuilder):
    """Builds :class:`VEDataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = NAME
    DEMO = ve_demo

    def build_dataset(self, split: str) -> VEDataset:
        cfg = self.settings()
        source, policy, filt, img_dbs = self.open_split(cfg, split, ("txt_db", "annotations"))
        columns = self.read_columns(cfg, split, source, img_dbs, filt, policy, "qids")
        return VEDataset(
            self.dataset_name, split, cfg, img_dbs=img_dbs, label2ans=list(VE_LABELS), num_answers=len(VE_LABELS),
            lengths_include_cls_sep=bool(cfg.get("lengths_include_cls_sep", True)),
            num_dropped=filt.num_dropped, **columns,
        )

    def _from_txt_db(self, cfg, split, img_dbs, filt, policy) -> Dict[str, Any]:
        txt_paths = split_paths(cfg, "txt_db", split, self.dataset_name)
        if not txt_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.txt_db.{split} lists no txt_dbs")
        txt_dbs = [TxtDB(p, -1) for p in txt_paths]
        cols: Dict[str, List] = {k: [] for k in ("qids", "txt_lens", "img_keys", "img_db_index", "txt_keys", "txt_db_index")}
        for t_idx, tdb in enumerate(txt_dbs):
            for key, tlen in tdb.id2len.items():
                if filt.over_limit(tlen):
                    continue
                image = tdb.txt2img.get(key) or tdb[key]["img_fname"]
                located = check_image(img_dbs, image, f'txt_db {tdb.db_dir}, example "{key}"', filt, policy)
                if located is None:
                    continue
                for column, value in (("qids", key), ("txt_lens", int(tlen)), ("img_keys", image),
                                      ("img_db_index", located), ("txt_keys", key), ("txt_db_index", t_idx)):
                    cols[column].append(value)
        return dict(cols, txt_dbs=txt_dbs, cls_id=txt_dbs[0].cls_, sep_id=txt_dbs[0].sep)

    def _from_annotations(self, cfg, split, img_dbs, filt, policy) -> Dict[str, Any]:
        ann_paths = split_paths(cfg, "annotations", split, self.dataset_name)
        if not ann_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.annotations.{split} lists no annotation files")
        tok = WordPieceTokenizer(resolve_path(cfg, cfg.get("vocab"), self.dataset_name, "vocab"),
                                 lowercase=bool(cfg.get("lowercase", False)))
        key_format = str(cfg.get("img_key_format", "flickr30k_{image_id:012d}.npz"))
        cols: Dict[str, List] = {k: [] for k in ("qids", "txt_lens", "img_keys", "img_db_index", "input_ids", "targets")}
        for path in ann_paths:
            lines = list(read_jsonl(path, ANNOTATION_HINT))
            for number, ann in lines:
                missing = [f for f in ("Flikr30kID", "sentence2", "pairID") if f not in ann]
                if missing:
                    raise DataError(f"{path}, line {number}: an SNLI-VE example needs {missing}. {ANNOTATION_HINT}")
            all_ids = tok.encode_batch([ann["sentence2"] for _, ann in lines])
            for (number, ann), ids in zip(lines, all_ids):
                where = f"{path}, line {number} ({ann['pairID']})"
                target = ve_target(ann.get("gold_label"), where)
                if filt.over_limit(len(ids)):
                    continue
                image = flickr_key(key_format, ann["Flikr30kID"], where)
                located = check_image(img_dbs, image, where, filt, policy)
                if located is None:
                    continue
                for column, value in (("qids", str(ann["pairID"])), ("txt_lens", len(ids)), ("img_keys", image),
                                      ("img_db_index", located), ("input_ids", ids), ("targets", target)):
                    cols[column].append(value)
        if all(t is None for t in cols["targets"]):
            cols["targets"] = None
        return dict(cols, cls_id=tok.token_to_id("[CLS]"), sep_id=tok.token_to_id("[SEP]"))


def flickr_key(key_format: str, flickr_id: Any, where: str) -> str:
    """The img_db key of a Flickr30k image (``"2248275918.jpg"`` -> ``flickr30k_002248275918.npz``)."""
    stem = str(flickr_id).split(".")[0]
    if not stem.isdigit():
        raise DataError(f"{where}: Flikr30kID {flickr_id!r} is not a numeric Flickr30k file name")
    try:
        return key_format.format(image_id=int(stem))
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"dataset_config.{NAME}.img_key_format {key_format!r} cannot name image {flickr_id}: "
                          f"{err}. Use the field {{image_id}}.") from err
