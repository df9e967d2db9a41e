"""One split of GQA: VQA's dataset (question ids kept as strings), GQA's submission format."""
from __future__ import annotations

from typing import Any, Dict, List

from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.task_common import unique_by, write_json_atomic
from villa_plugin.tasks.vqa.dataset import VQADataset


class GQADataset(VQADataset):
    """:class:`VQADataset` over LXMERT's GQA records; predictions are the test-std submission."""

    def format_predictions(self, batch: SampleList, output: Dict[str, Any]) -> List[Dict[str, Any]]:
        """``[{"questionId": str, "prediction": str}]``: the arg-max answer over the vocabulary."""
        scores = output["scores"].detach()[:, : len(self.label2ans)]
        best = scores.argmax(dim=-1).cpu().tolist()
        return [{"questionId": str(q), "prediction": self.label2ans[b]} for q, b in zip(batch["qids"], best)]

    def write_predictions(self, records: List[Dict[str, Any]], path: str) -> str:
        """The GQA server's JSON list (LXMERT's ``submit_predict.json``), one record per question."""
        return write_json_atomic(unique_by(records, "questionId"), path)
