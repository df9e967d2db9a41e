"""Registered builder ``gqa``: GQA balanced from LXMERT's processed JSON (lxmert.md §6).

Source ``lxmert_json`` (the only one): ``annotations.<split>`` lists JSON files, each a list of
records ``{"question_id": str, "img_id": str, "sent": str, "label": {answer: score}}`` (``label``
absent in ``submit.json``), as ``LXMERT-AdvTrain``'s ``data/gqa/{train,valid,testdev,submit}.json``.
The official recipe trains on ``train`` + ``valid``, validates on ``testdev`` and predicts ``submit``
(test-std): our splits ``train`` / ``val`` / ``test`` name those files in ``defaults.yaml``.

Targets: soft scores over ``ans2label`` (``trainval_ans2label.json``, 1,842 answers); answers outside
it are dropped from the target, as the reference does (counted, logged). The question is tokenised
with the local WordPiece ``vocab`` (bert-base-uncased, ``lowercase: true`` for LXMERT). Each record's
image is ``img_key_format`` filled with its ``img_id``, looked up in the split's ``img_db`` list
(UNITER-format LMDB features, e.g. converted from ``vg_gqa_obj36.tsv``).
"""
from __future__ import annotations

from typing import Any, Dict

import villa_plugin.tasks.gqa.demo as gqa_demo
from villa_plugin.datasets.task_builder import ExampleRecords, SplitContext
from villa_plugin.registry import registry
from villa_plugin.tasks.gqa.dataset import GQADataset
from villa_plugin.tasks.vqa.builder import VQA2Builder

HINT = ("GQA needs LXMERT's processed files (data/gqa/*.json of airsplay/lxmert), or use "
        "dataset_config.gqa.demo=true for the bundled demo.")


@registry.register_builder("gqa")
class GQABuilder(VQA2Builder):
    """Builds :class:`GQADataset` splits from LXMERT's GQA JSON (answer vocabulary as VQA's)."""

    NAME = "gqa"
    DEMO = gqa_demo
    SOURCES = ("lxmert_json",)
    DEFAULT_MAX_TXT_LEN = 18
    LXMERT_JSON_KEY = "annotations"
    LXMERT_JSON_HINT = HINT

    def demo_settings(self, p: Dict[str, Any]) -> Dict[str, Any]:
        """The demo's files (several per split: train = train + valid), read with source ``lxmert_json``."""
        return dict(
            source="lxmert_json", data_dir=p["root"], vocab=p["vocab"], lowercase=p["lowercase"],
            ans2label=p["ans2label"], img_key_format=p["img_key_format"], num_answers=p["num_answers"],
            **{key: {s: v[key] for s, v in p["splits"].items()} for key in ("annotations", "img_db")},
            **{key: p[key] for key in self.DEMO_FEATURE_KEYS},
        )

    def make_dataset(self, ctx: SplitContext, records: ExampleRecords) -> GQADataset:
        return GQADataset(self.dataset_name, ctx.split, ctx.cfg, records, ctx.img_dbs, label2ans=ctx.extra["label2ans"],
                          num_answers=ctx.extra["num_answers"], num_dropped=ctx.filt.num_dropped)

    def lxmert_question_id(self, value: Any) -> str:
        """GQA's ids are strings with leading zeros (``"07333408"``)."""
        return str(value)
