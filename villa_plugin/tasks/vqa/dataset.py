"""One split of VQA: questions (token ids), their image's regions, soft-score targets."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
from villa_plugin.datasets.collate import vqa_collate
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_builder import ExampleRecords
from villa_plugin.datasets.task_common import read_json, unique_by, write_json_atomic


class VQADataset(BaseDataset):
    """Examples are held as columns (cheap to fork into workers, even at 1.1M questions).

    Text comes either from memory (``input_ids`` / ``targets`` lists, built from VQA JSON) or from
    txt_dbs (``txt_keys`` + ``txt_db_index``, read per item). ``__getitem__`` returns
    ``{id, input_ids ([CLS] q [SEP]), img_feat (the db's dtype, fp16), img_pos_feat, target}``;
    :meth:`collate` makes the float32 batch.
    """

    def __init__(self, dataset_name: str, dataset_type: str, config: Any, records: ExampleRecords,
                 img_dbs: List[ImgFeatDB], label2ans: List[str], num_answers: int,
                 lengths_include_cls_sep: bool = True, num_dropped: int = 0):
        super().__init__(dataset_name, dataset_type, config)
        self.qids = records.ids
        self.img_keys = records.img_keys
        self.img_db_index = np.asarray(records.img_db_index, dtype=np.int32)
        self.img_dbs = img_dbs
        self.cls_id, self.sep_id = int(records.cls_id), int(records.sep_id)
        self.label2ans = label2ans
        self.num_answers = int(num_answers)
        self._input_ids, self._targets = records.input_ids, records.targets
        self._txt_dbs, self._txt_keys = records.txt_dbs, records.txt_keys
        self._txt_db_index = None if records.txt_db_index is None else np.asarray(records.txt_db_index, dtype=np.int32)
        self.num_dropped = int(num_dropped)
        nbbs = np.asarray([img_dbs[d].nbb(k) for d, k in zip(self.img_db_index, self.img_keys)], dtype=np.int64)
        extra = 2 if lengths_include_cls_sep else 0
        self._lengths = (np.asarray(records.txt_lens, dtype=np.int64) + extra + nbbs).tolist()

    def __len__(self) -> int:
        return len(self.qids)

    def lengths(self) -> List[int]:
        """Tokens per example: question tokens (+2 for [CLS]/[SEP] unless disabled) + regions."""
        return self._lengths

    def _text(self, i: int):
        if self._input_ids is not None:
            return self._input_ids[i], (self._targets[i] if self._targets is not None else None)
        example = self._txt_dbs[self._txt_db_index[i]][self._txt_keys[i]]
        return example["input_ids"], example.get("target")

    def __getitem__(self, i: int) -> Dict[str, Any]:
        ids, target = self._text(i)
        # features as stored (fp16): vqa_collate converts them straight into its float32 batch
        img_feat, img_pos_feat = self.img_dbs[self.img_db_index[i]].regions(self.img_keys[i])
        return {
            "id": self.qids[i],
            "input_ids": [self.cls_id, *[int(t) for t in ids], self.sep_id],
            "img_feat": img_feat,
            "img_pos_feat": img_pos_feat,
            "target": target,
        }

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        return vqa_collate(examples, self.num_answers, self.dataset_name, self.dataset_type)

    def baselines(self, train: Optional[BaseDataset] = None) -> Dict[str, float]:
        """``majority_baseline``: the score (VQA accuracy; exact match for one-answer targets) of always
        giving the answer with the largest total score in ``train`` (this split's own without one).
        Known only when both splits hold their targets in memory (JSON sources, not txt_dbs)."""
        reference = train if isinstance(train, VQADataset) else self
        if self._targets is None or reference._targets is None or not self._targets:
            return {}
        totals = np.zeros(self.num_answers, dtype=np.float64)
        for target in reference._targets:
            if target is not None:
                np.add.at(totals, np.asarray(target["labels"], dtype=np.int64), np.asarray(target["scores"], dtype=np.float64))
        answer = int(totals.argmax())
        scores = [dict(zip(t["labels"], t["scores"])).get(answer, 0.0) if t is not None else 0.0 for t in self._targets]
        return {"majority_baseline": float(np.mean(scores))}

    def format_predictions(self, batch: SampleList, output: Dict[str, Any]) -> List[Dict[str, Any]]:
        """``[{"question_id": int, "answer": str}]``: the arg-max answer over the vocabulary."""
        scores = output["scores"].detach()[:, : len(self.label2ans)]
        best = scores.argmax(dim=-1).cpu().tolist()
        return [{"question_id": _as_int(q), "answer": self.label2ans[b]} for q, b in zip(batch["qids"], best)]

    def write_predictions(self, records: List[Dict[str, Any]], path: str) -> str:
        """The EvalAI / UNITER ``inf_vqa.py`` JSON list (one record per question, first one kept)."""
        unique = [{"question_id": r["question_id"], "answer": r["answer"]} for r in unique_by(records, "question_id")]
        return write_json_atomic(unique, path)


def _as_int(qid: Any) -> Any:
    if isinstance(qid, torch.Tensor):
        qid = qid.item()
    try:
        return int(qid)
    except (TypeError, ValueError):
        return qid


def read_label2ans(path: str) -> List[str]:
    """Answers ordered by label from an ``ans2label.json`` (UNITER's ``utils/ans2label.json``)."""
    if not os.path.isfile(path):
        raise DataError(
            f"Answer vocabulary not found: {path}. Copy UNITER's utils/ans2label.json (3129 answers) there "
            f"or set the dataset's `ans2label` key (dataset_config.vqa2.demo=true uses the bundled demo instead)."
        )
    ans2label = read_json(path)
    labels = sorted(ans2label.values())
    if labels != list(range(len(labels))):
        raise DataError(f"{path}: labels must be 0..{len(labels) - 1} without gaps or repeats")
    label2ans = [""] * len(labels)
    for ans, lab in ans2label.items():
        label2ans[lab] = ans
    return label2ans
