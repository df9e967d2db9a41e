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

import logging
from typing import Any, Dict

import villa_plugin.tasks.gqa.demo as gqa_demo
from villa_plugin.common.errors import DataError
from villa_plugin.datasets.task_builder import ExampleRecords, SplitContext
from villa_plugin.datasets.task_common import read_json
from villa_plugin.registry import registry
from villa_plugin.tasks.gqa.dataset import GQADataset
from villa_plugin.tasks.vqa.builder import VQA2Builder

logger = logging.getLogger(__name__)

HINT = ("GQA needs LXMERT's processed files (data/gqa/*.json of airsplay/lxmert), or use "
        "dataset_config.gqa.demo=true for the bundled demo.")
REQUIRED = ("question_id", "img_id", "sent")


@registry.register_builder("gqa")
class GQABuilder(VQA2Builder):
    """Builds :class:`GQADataset` splits from LXMERT's GQA JSON (answer vocabulary as VQA's)."""

    NAME = "gqa"
    DEMO = gqa_demo
    SOURCES = ("lxmert_json",)
    DEFAULT_MAX_TXT_LEN = 18

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

    def read_lxmert_json(self, ctx: SplitContext) -> ExampleRecords:
        """LXMERT's GQA records (see the module docstring); targets when every record has a ``label``."""
        tok = ctx.tokenizer()
        ans2label = {a: i for i, a in enumerate(ctx.extra["label2ans"])}
        key_format = str(ctx.cfg.get("img_key_format", "{img_id}"))
        records = ExampleRecords.in_memory(tok)
        out_of_vocabulary = 0
        for path in ctx.paths("annotations", "GQA JSON files"):
            items = read_json(path, HINT)
            if not isinstance(items, list):
                raise DataError(f"{path}: expected a list of GQA records ({list(REQUIRED)} + label). {HINT}")
            for n, item in enumerate(items):
                missing = [f for f in REQUIRED if f not in item]
                if missing:
                    raise DataError(f"{path}, record {n}: a GQA record needs {missing}. {HINT}")
            for item, ids in zip(items, tok.encode_batch([item["sent"] for item in items])):
                if ctx.filt.over_limit(len(ids)):
                    continue
                key = key_format.format(img_id=item["img_id"])
                located = ctx.locate([key], f"{path}, question {item['question_id']}")
                if located is None:
                    continue
                target = None
                if "label" in item:
                    pairs = sorted((ans2label[a], float(s)) for a, s in item["label"].items() if a in ans2label)
                    out_of_vocabulary += len(item["label"]) - len(pairs)
                    target = {"labels": [p[0] for p in pairs], "scores": [p[1] for p in pairs]}
                records.add(str(item["question_id"]), len(ids), key, located[0], input_ids=ids, target=target)
        if out_of_vocabulary:
            logger.info("gqa %s: %d labels outside the answer vocabulary dropped from the targets", ctx.split,
                        out_of_vocabulary)
        return records.drop_absent_targets()
