"""One split of VCR: questions, each expanding to its (question, candidate) rows (see builder.py)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_builder import ExampleRecords
from villa_plugin.datasets.task_common import (
    candidate_rows,
    check_label,
    collate_example_rows,
    unique_by,
    with_extension,
    write_csv_atomic,
)
from villa_plugin.tasks.vcr.metrics import vcr_candidate_scores

NUM_CHOICES = 4
LABEL_FIX = f"VCR labels index the {NUM_CHOICES} choices (0-{NUM_CHOICES - 1}); fix or drop the example."
TASKS = ("qa", "qar")
CSV_HEADER = (["annot_id"] + [f"answer_{i}" for i in range(NUM_CHOICES)]
              + [f"rationale_conditioned_on_a{a}_{i}" for a in range(NUM_CHOICES) for i in range(NUM_CHOICES)])


@dataclasses.dataclass
class VcrRecords(ExampleRecords):
    """VCR's records: text read from txt_dbs or held as checked ``texts`` (``{q, as, rs, qa_target,
    qar_target}``); ``labelled`` tells whether the split has answer and rationale labels."""

    texts: Optional[List[Dict[str, Any]]] = None
    labelled: bool = True

    def add_text(self, annot_id: str, txt_len: int, img_keys: Tuple[str, str], located: Sequence[int],
                 text: Dict[str, Any]) -> None:
        self.ids.append(annot_id)
        self.txt_lens.append(int(txt_len))
        self.img_keys.append(img_keys)
        self.img_db_index.append(tuple(located))
        self.texts.append(text)


class VcrDataset(BaseDataset):
    """VCR questions; each item expands to its (question, candidate) rows (see the module docstring)."""

    def __init__(self, dataset_name: str, dataset_type: str, config: Any, records: VcrRecords,
                 img_dbs_gt: List[ImgFeatDB], img_dbs: List[ImgFeatDB], qar_candidates: str,
                 train_tasks: Sequence[str] = TASKS, num_dropped: int = 0):
        super().__init__(dataset_name, dataset_type, config)
        self.annot_ids = records.ids
        self.img_keys, self.img_db_index = records.img_keys, records.img_db_index
        self.img_dbs_gt, self.img_dbs = img_dbs_gt, img_dbs
        self.cls_id, self.sep_id = int(records.cls_id), int(records.sep_id)
        self.qar_candidates = qar_candidates
        self.train_tasks = tuple(train_tasks)
        self._texts, self._txt_dbs = records.texts, records.txt_dbs
        self._txt_db_index = None if records.txt_db_index is None else np.asarray(records.txt_db_index, dtype=np.int32)
        self.labelled = bool(records.labelled)
        self.num_dropped = int(num_dropped)
        nbbs = [img_dbs_gt[g].nbb(kg) + img_dbs[d].nbb(kd) for (g, d), (kg, kd) in zip(self.img_db_index, self.img_keys)]
        self._lengths = [int(t) + n for t, n in zip(records.txt_lens, nbbs)]

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


__all__ = ["VcrDataset", "VcrRecords", "CSV_HEADER", "NUM_CHOICES", "TASKS"]
