"""One split of SNLI-VE: VQA's dataset with 3 labels, label checks and SNLI-VE's prediction format."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.task_common import check_label, unique_by, write_json_atomic
from villa_plugin.tasks.visual_entailment.head import VE_LABELS
from villa_plugin.tasks.vqa.dataset import VQADataset

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


__all__ = ["VEDataset", "ve_target"]
