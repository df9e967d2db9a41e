"""One split of NLVR2: each example is two rows (the sentence with the left / the right image)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_builder import ExampleRecords
from villa_plugin.datasets.task_common import collate_example_rows, make_row, unique_by, with_extension, write_csv_atomic
from villa_plugin.tasks.nlvr2.metrics import nlvr2_sentence_key

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

    def __init__(self, dataset_name: str, dataset_type: str, config: Any, records: ExampleRecords,
                 img_dbs: List[ImgFeatDB], use_img_type: bool = True, lengths_include_cls_sep: bool = True,
                 num_dropped: int = 0):
        super().__init__(dataset_name, dataset_type, config)
        self.identifiers = records.ids
        self.img_keys, self.img_db_index, self.img_dbs = records.img_keys, records.img_db_index, img_dbs
        self.cls_id, self.sep_id = int(records.cls_id), int(records.sep_id)
        self.use_img_type = bool(use_img_type)
        self._input_ids, self._targets = records.input_ids, records.targets
        self._txt_dbs = records.txt_dbs
        self._txt_db_index = None if records.txt_db_index is None else np.asarray(records.txt_db_index, dtype=np.int32)
        self.num_dropped = int(num_dropped)
        identifiers, txt_lens, img_db_index, img_keys = self.identifiers, records.txt_lens, self.img_db_index, self.img_keys
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

    def baselines(self, train: Optional[BaseDataset] = None) -> Dict[str, float]:
        """``majority_baseline``: the accuracy of always giving the label most frequent in ``train``
        (this split's own without one). Known only when both splits hold their labels in memory
        (annotation / LXMERT JSON sources, not txt_dbs)."""
        reference = train if isinstance(train, Nlvr2Dataset) else self
        labels = [t for t in self._targets or [] if t is not None]
        reference_labels = [t for t in reference._targets or [] if t is not None]
        if not labels or not reference_labels:
            return {}
        majority = int(sum(reference_labels) * 2 > len(reference_labels))  # ties: False (0)
        return {"majority_baseline": sum(t == majority for t in labels) / len(labels)}

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
            feat, pos = self.img_dbs[db_index].regions(key)  # fp16 as stored: the collate makes float32
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


__all__ = ["Nlvr2Dataset", "parse_label"]
