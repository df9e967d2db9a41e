"""One split of a pre-training corpus, seen as one dataset per task (uniter-pretraining.md §3-§6, §8).

- :class:`PretrainCorpus`: the captions (token ids without ``[CLS]``/``[SEP]``) and their images.
- :class:`PretrainTaskDataset`: the corpus as one task (``mlm``, ``mrfr``, ``mrc``, ``mrckl``, ``itm``):
  ``__getitem__`` masks / draws the negative of one example, ``collate`` is the task's collate.
- :class:`~villa_plugin.datasets.task_mixture.TaskMixture` of those views is what the builder returns;
  the trainer turns every view into a train stream ``<task>_<dataset>`` (the official loader name).

Randomness is a function of ``(seed, epoch, task, index)`` (set by the loader through
``set_epoch``), so the masks and ITM negatives of an example are the same whatever the number of
workers or ranks, a resumed run sees exactly what the uninterrupted one saw, and ITM negatives are
redrawn every epoch (as the official ``ItmDataset.new_epoch``). Two deviations, both documented in
docs/pretraining.md: each ITM label is drawn per example (the official code draws the epoch's labels
with one ``np.random.choice``; same distribution), and the negative image pool is the split's images
(officially the images of the rank's shard).
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_builder import ExampleRecords
from villa_plugin.tasks.pretrain.collate import itm_collate, mlm_collate, mrm_collate
from villa_plugin.tasks.pretrain.masking import (
    ITM_NEG_PROB,
    MLM_PROB,
    MRM_PROB,
    TextSpecials,
    itm_image,
    mlm_text,
    plain_text,
    region_mask,
)
from villa_plugin.tasks.pretrain.model import task_family

SOFT_LABELS_KEY = "soft_labels"


class PretrainCorpus:
    """The kept captions of one split and the img_dbs their images live in (shared by the task views)."""

    def __init__(self, name: str, split: str, records: ExampleRecords, img_dbs: List[ImgFeatDB], specials: TextSpecials):
        self.name, self.split = name, split
        self.records, self.img_dbs, self.specials = records, img_dbs, specials
        nbbs = [img_dbs[d].nbb(k) for d, k in zip(records.img_db_index, records.img_keys)]
        # the official lens: caption wordpieces + regions (CLS/SEP uncounted, §3)
        self.lengths = (np.asarray(records.txt_lens, dtype=np.int64) + np.asarray(nbbs, dtype=np.int64)).tolist()
        pool = dict(zip(records.img_keys, records.img_db_index))
        self.image_pool: List[str] = sorted(pool)
        self.image_db: Dict[str, int] = pool

    def __len__(self) -> int:
        return len(self.records)

    def tokens(self, i: int) -> List[int]:
        r = self.records
        if r.input_ids is not None:
            return [int(t) for t in r.input_ids[i]]
        return [int(t) for t in r.txt_dbs[r.txt_db_index[i]][r.txt_keys[i]]["input_ids"]]

    def image(self, key: str, with_soft_labels: bool = False) -> Dict[str, torch.Tensor]:
        """``img_feat [n, 2048]``, ``img_pos_feat [n, 7]`` (and ``soft_labels [n, 1601]``) of image ``key``."""
        db = self.img_dbs[self.image_db[key]]
        feat, pos = db[key]
        out = {"img_feat": feat, "img_pos_feat": pos}
        if with_soft_labels:
            dump = db.dump(key)
            if SOFT_LABELS_KEY not in dump:
                raise missing_soft_labels(db, key)
            out[SOFT_LABELS_KEY] = torch.from_numpy(dump[SOFT_LABELS_KEY][: feat.size(0)])
        return out

    def check_soft_labels(self, task: str) -> None:
        """A ConfigError-like DataError naming the img_db and the key when an MRC task's db lacks soft labels."""
        for index, db in enumerate(self.img_dbs):
            key = next((k for k, d in self.image_db.items() if d == index), None)
            if key is not None and SOFT_LABELS_KEY not in db.dump(key):
                raise missing_soft_labels(db, key, task, self.name)


def missing_soft_labels(db: ImgFeatDB, key: str, task: str = "mrc", dataset: str = "") -> DataError:
    where = f"dataset {dataset}: " if dataset else ""
    return DataError(
        f"{where}task {task} needs '{SOFT_LABELS_KEY}' [n, 1601] (the detector's class distribution) in img_db "
        f"{db.db_path}, but its record '{key}' has only {sorted(db.dump(key))}. Use UNITER's pre-training "
        f"img_dbs (they store '{SOFT_LABELS_KEY}'), or remove {task} from the dataset's tasks."
    )


class PretrainTaskDataset(BaseDataset):
    """One task view of a :class:`PretrainCorpus` (see the module docstring)."""

    def __init__(self, corpus: PretrainCorpus, task: str, config: Any = None, with_ot: bool = True,
                 mlm_prob: float = MLM_PROB, mrm_prob: float = MRM_PROB, itm_neg_prob: float = ITM_NEG_PROB):
        super().__init__(corpus.name, corpus.split, config)
        self.corpus, self.task, self.family = corpus, task, task_family(task)
        self.with_ot = bool(with_ot)
        self.mlm_prob, self.mrm_prob, self.itm_neg_prob = float(mlm_prob), float(mrm_prob), float(itm_neg_prob)
        self.seed, self.epoch = 0, 0
        if self.family == "mrc":
            corpus.check_soft_labels(task)
        if self.family == "itm" and len(corpus.image_pool) < 2:
            raise DataError(f"dataset {corpus.name} {corpus.split}: ITM needs captions of at least two images "
                            f"(negatives are other images), got {len(corpus.image_pool)}.")

    def __len__(self) -> int:
        return len(self.corpus)

    def lengths(self) -> List[int]:
        return self.corpus.lengths

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Select the masks / negatives of ``epoch`` (called by the loader before each pass)."""
        self.seed, self.epoch = int(seed), int(epoch)

    def rng(self, i: int) -> random.Random:
        # a str seed is hashed with sha512: the same stream in every process
        return random.Random(f"{self.seed}:{self.epoch}:{self.task}:{i}")

    def __getitem__(self, i: int) -> Dict[str, Any]:
        corpus, rng = self.corpus, self.rng(i)
        tokens = corpus.tokens(i)
        key = corpus.records.img_keys[i]
        row: Dict[str, Any] = {"id": corpus.records.ids[i]}
        if self.family == "mlm":
            row["input_ids"], row["txt_labels"] = mlm_text(tokens, corpus.specials, rng, self.mlm_prob)
            row.update(corpus.image(key))
        elif self.family in ("mrfr", "mrc"):
            row["input_ids"] = plain_text(tokens, corpus.specials)
            row.update(corpus.image(key, with_soft_labels=self.family == "mrc"))
            row["img_mask"] = region_mask(row["img_feat"].size(0), rng, self.mrm_prob)
        else:
            row["input_ids"] = plain_text(tokens, corpus.specials)
            row["target"] = 0 if rng.random() < self.itm_neg_prob else 1
            row.update(corpus.image(itm_image(key, row["target"], corpus.image_pool, rng)))
        return row

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        if self.family == "mlm":
            batch = mlm_collate(examples)
        elif self.family in ("mrfr", "mrc"):
            batch = mrm_collate(examples, self.task)
        else:
            batch = itm_collate(examples, with_ot=self.with_ot)
        batch["task"] = self.task
        batch["ids"] = [e["id"] for e in examples]
        batch["dataset_name"] = self.dataset_name
        batch["dataset_type"] = self.dataset_type
        return batch


def check_mix(tasks: Sequence[str], mix_ratio: Sequence[Any], where: str) -> List[Tuple[str, float]]:
    """``[(task, ratio)]`` from a dataset's ``tasks`` / ``mix_ratio`` lists (paired by position)."""
    from villa_plugin.common.errors import ConfigError
    from villa_plugin.tasks.pretrain.model import TASKS

    tasks, ratios = list(tasks or []), list(mix_ratio or [])
    if not tasks:
        raise ConfigError(f"{where}.tasks lists no pre-training task; use some of {', '.join(TASKS)}.")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"{where}.tasks: unknown task(s) {unknown}; use some of {', '.join(TASKS)}.")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"{where}.tasks names a task twice: {tasks}.")
    if len(ratios) != len(tasks):
        raise ConfigError(f"{where}.mix_ratio must give one ratio per task ({len(tasks)}: {tasks}), got {ratios}.")
    bad = [r for r in ratios if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0]
    if bad:
        raise ConfigError(f"{where}.mix_ratio must hold positive numbers, got {ratios}.")
    return [(t, float(r)) for t, r in zip(tasks, ratios)]


__all__ = ["PretrainCorpus", "PretrainTaskDataset", "check_mix", "missing_soft_labels", "SOFT_LABELS_KEY"]
