"""Registered builder ``nlvr2``: NLVR2 from UNITER's txt_db/img_db or from NLVR2's JSON lines.

Sources (``source``):

- ``txt_db``: UNITER's released dbs (``txt_db/nlvr2_{train,dev,test1}.db`` with the original fields
  plus ``input_ids``, ``img_fname`` (2 keys) and ``target`` (1 = True)), paired with
  ``img_db/nlvr2_{train,dev,test}``.
- ``annotations``: NLVR2's ``{train,dev,test1}.json`` (one JSON object per line with ``identifier``,
  ``sentence`` and ``label`` "True"/"False"; no label = unlabelled), tokenised with a local WordPiece
  ``vocab``. The images of ``<split>-<set>-<pair>-<sentence>`` are ``img_key_format`` filled with
  ``image_id = <split>-<set>-<pair>`` and ``side`` 0 / 1 (UNITER: ``nlvr2_{image_id}-img{side}.npz``).

Each example is two rows ``[CLS] sentence [SEP] + left regions`` / ``+ right regions`` with image
type ids 1 / 2 when ``use_img_type``. Token length for bucketing: ``2·text + nbb_left + nbb_right``
(text with [CLS]/[SEP] when ``lengths_include_cls_sep``). Training drops sentences longer than
``max_txt_len``; evaluation keeps them; both are counted and logged. Images missing from the dbs (or
with zero boxes) are an error naming the example, or with ``missing_images: skip`` dropped and
counted. ``demo: true`` materialises the bundled demo (``datasets/demos/nlvr2.py``) and reads it
with the configured ``source``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
import villa_plugin.tasks.nlvr2.demo as nlvr2_demo
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_common import (
    ExampleFilter,
    check_image,
    collate_example_rows,
    make_row,
    read_jsonl,
    resolve_path,
    split_paths,
    unique_by,
    with_extension,
    write_csv_atomic,
)
from villa_plugin.datasets.text import TxtDB, WordPieceTokenizer
from villa_plugin.datasets.task_builder import TaskBuilder
from villa_plugin.tasks.nlvr2.metrics import nlvr2_sentence_key
from villa_plugin.registry import registry

logger = logging.getLogger(__name__)

NAME = "nlvr2"
ANNOTATION_HINT = ("Get NLVR2's data/{train,dev,test1}.json from https://github.com/lil-lab/nlvr (nlvr2/data), "
                   "or use dataset_config.nlvr2.demo=true for the bundled demo.")
LABEL_FIX = 'NLVR2 labels are "True" / "False" (txt_db target 1 / 0); fix the file or drop the example.'


def parse_label(value: Any, where: str) -> Optional[int]:
    """1 for True, 0 for False, None when absent; DataError naming ``where`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise DataError(f"{where}: label {value!r} is outside the head's range (2 classes: False=0, True=1). {LABEL_FIX}")


class Nlvr2Dataset(BaseDataset):
    """NLVR2 examples as columns; text from memory (annotations) or read per item from txt_dbs.

    ``__getitem__`` -> ``{id, rows: [left row, right row], target, sentence_index}``; ``collate``
    -> the rows' UNITER fields (2 rows per example, left first) plus ``targets [B]`` (long, when
    labelled), ``sentence_index [B]``, ``num_sentences``, ``identifiers``.
    """

    def __init__(self, dataset_name: str, dataset_type: str, config: Any, *, identifiers: List[str],
                 txt_lens: Sequence[int], img_keys: List[Sequence[str]], img_db_index: List[Sequence[int]],
                 img_dbs: List[ImgFeatDB], cls_id: int, sep_id: int, use_img_type: bool = True,
                 input_ids: Optional[List[List[int]]] = None, targets: Optional[List[Optional[int]]] = None,
                 txt_dbs: Optional[List[TxtDB]] = None, txt_db_index: Optional[Sequence[int]] = None,
                 lengths_include_cls_sep: bool = True, num_dropped: int = 0):
        super().__init__(dataset_name, dataset_type, config)
        self.identifiers = identifiers
        self.img_keys, self.img_db_index, self.img_dbs = img_keys, img_db_index, img_dbs
        self.cls_id, self.sep_id = int(cls_id), int(sep_id)
        self.use_img_type = bool(use_img_type)
        self._input_ids, self._targets = input_ids, targets
        self._txt_dbs = txt_dbs
        self._txt_db_index = None if txt_db_index is None else np.asarray(txt_db_index, dtype=np.int32)
        self.num_dropped = int(num_dropped)
        sentences = [nlvr2_sentence_key(i) for i in identifiers]
        order = {s: n for n, s in enumerate(sorted(set(sentences)))}
        self.sentence_index = np.asarray([order[s] for s in sentences], dtype=np.int64)
        self.num_sentences = len(order)
        extra = 2 if lengths_include_cls_sep else 0
        nbbs = [sum(img_dbs[d].nbb(k) for d, k in zip(dbs, keys)) for dbs, keys in zip(img_db_index, img_keys)]
        self._lengths = [2 * (int(t) + extra) + n for t, n in zip(txt_lens, nbbs)]

    def __len__(self) -> int:
        return len(self.identifiers)

    def lengths(self) -> List[int]:
        """Tokens per example: 2 × text + regions of both images (UNITER's paired length)."""
        return self._lengths

    def _text(self, i: int):
        if self._input_ids is not None:
            return self._input_ids[i], (self._targets[i] if self._targets is not None else None)
        db = self._txt_dbs[self._txt_db_index[i]]
        example = db[self.identifiers[i]]
        where = f'txt_db {db.db_dir}, example "{self.identifiers[i]}"'
        target = example.get("target")
        return example["input_ids"], parse_label(target if target is not None else example.get("label"), where)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        ids, target = self._text(i)
        rows = []
        for side, (db_index, key) in enumerate(zip(self.img_db_index[i], self.img_keys[i])):
            feat, pos = self.img_dbs[db_index][key]
            img_type = side + 1 if self.use_img_type else None
            rows.append(make_row(self.cls_id, self.sep_id, [ids], feat, pos, img_type=img_type, row_id=self.identifiers[i]))
        return {"id": self.identifiers[i], "rows": rows, "target": target, "sentence_index": int(self.sentence_index[i])}

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        batch: Dict[str, Any] = {"sentence_index": torch.as_tensor([e["sentence_index"] for e in examples], dtype=torch.long)}
        batch.update(collate_example_rows(examples))
        if all(e["target"] is not None for e in examples):
            batch["targets"] = torch.as_tensor([e["target"] for e in examples], dtype=torch.long)
        batch["identifiers"] = [e["id"] for e in examples]
        batch["num_sentences"] = self.num_sentences
        batch["dataset_name"], batch["dataset_type"] = self.dataset_name, self.dataset_type
        return SampleList(batch)

    def format_predictions(self, batch: SampleList, output: Dict[str, Any]) -> List[Dict[str, Any]]:
        """``[{"identifier": str, "prediction": bool}]`` (True when logit 1 wins)."""
        predicted = output["scores"].detach().argmax(dim=-1).cpu().tolist()
        return [{"identifier": i, "prediction": bool(p == 1)} for i, p in zip(batch["identifiers"], predicted)]

    def write_predictions(self, records: List[Dict[str, Any]], path: str) -> str:
        """NLVR2's submission CSV: lines ``identifier,True|False`` (no header; a default ``.json``
        name becomes ``.csv``)."""
        rows = [(r["identifier"], "True" if r["prediction"] else "False") for r in unique_by(records, "identifier")]
        return write_csv_atomic(None, rows, with_extension(path, ".csv"))


@registry.register_builder(NAME)
class Nlvr2Builder(TaskBuilder):
    """Builds :class:`Nlvr2Dataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = NAME
    DEMO = nlvr2_demo

    def build_dataset(self, split: str) -> Nlvr2Dataset:
        cfg = self.settings()
        source, policy, filt, img_dbs = self.open_split(cfg, split, ("txt_db", "annotations"))
        columns = self.read_columns(cfg, split, source, img_dbs, filt, policy, "identifiers")
        return Nlvr2Dataset(
            self.dataset_name, split, cfg, img_dbs=img_dbs, use_img_type=bool(cfg.get("use_img_type", True)),
            lengths_include_cls_sep=bool(cfg.get("lengths_include_cls_sep", True)),
            num_dropped=filt.num_dropped, **columns,
        )

    def _images(self, image_keys: Sequence[str], img_dbs, where: str, filt: ExampleFilter, policy: str):
        located = []
        for key in image_keys:
            index = check_image(img_dbs, key, where, filt, policy)
            if index is None:
                return None
            located.append(index)
        return located

    def _from_txt_db(self, cfg, split, img_dbs, filt, policy) -> Dict[str, Any]:
        txt_paths = split_paths(cfg, "txt_db", split, self.dataset_name)
        if not txt_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.txt_db.{split} lists no txt_dbs")
        txt_dbs = [TxtDB(p, -1) for p in txt_paths]  # the length filter is applied (and counted) here
        cols: Dict[str, List] = {k: [] for k in ("identifiers", "txt_lens", "img_keys", "img_db_index", "txt_db_index")}
        for t_idx, tdb in enumerate(txt_dbs):
            for key, tlen in tdb.id2len.items():
                where = f'txt_db {tdb.db_dir}, example "{key}"'
                if filt.over_limit(tlen):
                    continue
                fnames = tdb.txt2img.get(key) or tdb[key]["img_fname"]
                if isinstance(fnames, str) or len(fnames) != 2:
                    raise DataError(f"{where}: img_fname must list 2 image keys (left, right), got {fnames!r}")
                located = self._images(fnames, img_dbs, where, filt, policy)
                if located is None:
                    continue
                cols["identifiers"].append(str(key))
                cols["txt_lens"].append(int(tlen))
                cols["img_keys"].append(list(fnames))
                cols["img_db_index"].append(located)
                cols["txt_db_index"].append(t_idx)
        return dict(cols, txt_dbs=txt_dbs, cls_id=txt_dbs[0].cls_, sep_id=txt_dbs[0].sep)

    def _from_annotations(self, cfg, split, img_dbs, filt, policy) -> Dict[str, Any]:
        ann_paths = split_paths(cfg, "annotations", split, self.dataset_name)
        if not ann_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.annotations.{split} lists no annotation files")
        tok = WordPieceTokenizer(resolve_path(cfg, cfg.get("vocab"), self.dataset_name, "vocab"),
                                 lowercase=bool(cfg.get("lowercase", False)))
        key_format = str(cfg.get("img_key_format", "nlvr2_{image_id}-img{side}.npz"))
        cols: Dict[str, List] = {k: [] for k in ("identifiers", "txt_lens", "img_keys", "img_db_index", "input_ids", "targets")}
        for path in ann_paths:
            lines = list(read_jsonl(path, ANNOTATION_HINT))
            for (number, ann) in lines:
                if "identifier" not in ann or "sentence" not in ann:
                    raise DataError(f"{path}, line {number}: an NLVR2 example needs 'identifier' and 'sentence'. {ANNOTATION_HINT}")
            all_ids = tok.encode_batch([ann["sentence"] for _, ann in lines])
            for (number, ann), ids in zip(lines, all_ids):
                where = f"{path}, line {number} ({ann['identifier']})"
                target = parse_label(ann.get("label"), where)
                if filt.over_limit(len(ids)):
                    continue
                image_id = str(ann["identifier"]).rsplit("-", 1)[0]
                keys = [image_key(key_format, image_id, side) for side in (0, 1)]
                located = self._images(keys, img_dbs, where, filt, policy)
                if located is None:
                    continue
                cols["identifiers"].append(str(ann["identifier"]))
                cols["txt_lens"].append(len(ids))
                cols["img_keys"].append(keys)
                cols["img_db_index"].append(located)
                cols["input_ids"].append(ids)
                cols["targets"].append(target)
        if all(t is None for t in cols["targets"]):
            cols["targets"] = None
        return dict(cols, cls_id=tok.token_to_id("[CLS]"), sep_id=tok.token_to_id("[SEP]"))


def image_key(key_format: str, image_id: str, side: int) -> str:
    """An NLVR2 image's img_db key, e.g. ``nlvr2_dev-850-0-img1.npz``."""
    try:
        return key_format.format(image_id=image_id, side=side)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"dataset_config.nlvr2.img_key_format {key_format!r} cannot name image {image_id} "
                          f"side {side}: {err}. Use the fields {{image_id}} and {{side}}.") from err
