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

from typing import Any

import villa_plugin.tasks.visual_entailment.demo as ve_demo
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.task_builder import ExampleRecords, SplitContext, TaskBuilder
from villa_plugin.registry import registry
from villa_plugin.tasks.visual_entailment.dataset import VEDataset, ve_target
from villa_plugin.tasks.visual_entailment.head import VE_LABELS

NAME = "visual_entailment"
ANNOTATION_HINT = ("Get snli_ve_{train,dev,test}.jsonl from https://github.com/necla-ml/SNLI-VE, or use "
                   "dataset_config.visual_entailment.demo=true for the bundled demo.")


@registry.register_builder(NAME)
class VEBuilder(TaskBuilder):
    """Builds :class:`VEDataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = NAME
    DEMO = ve_demo

    def make_dataset(self, ctx: SplitContext, records: ExampleRecords) -> VEDataset:
        return VEDataset(self.dataset_name, ctx.split, ctx.cfg, records, ctx.img_dbs, label2ans=list(VE_LABELS),
                         num_answers=len(VE_LABELS), num_dropped=ctx.filt.num_dropped,
                         lengths_include_cls_sep=bool(ctx.cfg.get("lengths_include_cls_sep", True)))

    def read_txt_db(self, ctx: SplitContext) -> ExampleRecords:
        txt_dbs = self.open_txt_dbs(ctx)
        records = ExampleRecords.for_txt_dbs(txt_dbs)
        for ex in self.txt_db_examples(ctx, txt_dbs):
            image = ex.img_fname()
            located = ctx.locate([image], ex.where)
            if located is not None:
                records.add(ex.key, ex.length, image, located[0], txt=ex)
        return records

    def read_annotations(self, ctx: SplitContext) -> ExampleRecords:
        tok = ctx.tokenizer()
        key_format = str(ctx.cfg.get("img_key_format", "flickr30k_{image_id:012d}.npz"))
        records = ExampleRecords.in_memory(tok)
        lines = self.annotation_lines(ctx, tok, ("Flikr30kID", "sentence2", "pairID"), "sentence2", ANNOTATION_HINT)
        for path, number, ann, ids in lines:
            where = f"{path}, line {number} ({ann['pairID']})"
            target = ve_target(ann.get("gold_label"), where)
            if ctx.filt.over_limit(len(ids)):
                continue
            image = flickr_key(key_format, ann["Flikr30kID"], where)
            located = ctx.locate([image], where)
            if located is not None:
                records.add(str(ann["pairID"]), len(ids), image, located[0], input_ids=ids, target=target)
        return records.drop_absent_targets()


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
