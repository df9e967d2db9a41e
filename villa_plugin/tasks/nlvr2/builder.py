"""Registered builder ``nlvr2``: NLVR2 from UNITER's txt_db/img_db or from NLVR2's JSON lines.

Sources (``source``):

- ``txt_db``: UNITER's released dbs (``txt_db/nlvr2_{train,dev,test1}.db`` with the original fields
  plus ``input_ids``, ``img_fname`` (2 keys) and ``target`` (1 = True)), paired with
  ``img_db/nlvr2_{train,dev,test}``.
- ``annotations``: NLVR2's ``{train,dev,test1}.json`` (one JSON object per line with ``identifier``,
  ``sentence`` and ``label`` "True"/"False"; no label = unlabelled), tokenised with a local WordPiece
  ``vocab``. The images of ``<split>-<set>-<pair>-<sentence>`` are ``img_key_format`` filled with
  ``image_id = <split>-<set>-<pair>`` and ``side`` 0 / 1 (UNITER: ``nlvr2_{image_id}-img{side}.npz``).
- ``lxmert_json``: LXMERT's processed records (airsplay/lxmert ``data/nlvr2/{train,valid,test}.json``),
  JSON lists of ``{"identifier", "img0", "img1", "sent", "label": 0/1, "uid"}`` named by
  ``lxmert_json.<split>``. Image keys as above, with ``{img_id}`` = ``img0`` / ``img1`` available too
  (``nlvr2_{img_id}.npz`` names the same key as the default format).

Each example is two rows ``[CLS] sentence [SEP] + left regions`` / ``+ right regions`` with image
type ids 1 / 2 when ``use_img_type``. Token length for bucketing: ``2·text + nbb_left + nbb_right``
(text with [CLS]/[SEP] when ``lengths_include_cls_sep``). Training drops sentences longer than
``max_txt_len``; evaluation keeps them; both are counted and logged. Images missing from the dbs (or
with zero boxes) are an error naming the example, or with ``missing_images: skip`` dropped and
counted. ``demo: true`` materialises the bundled demo (``tasks/nlvr2/demo.py``) and reads it
with the configured ``source``.
"""
from __future__ import annotations

import villa_plugin.tasks.nlvr2.demo as nlvr2_demo
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.task_builder import ExampleRecords, SplitContext, TaskBuilder
from villa_plugin.datasets.task_common import read_lxmert_records
from villa_plugin.registry import registry
from villa_plugin.tasks.nlvr2.dataset import Nlvr2Dataset, parse_label

NAME = "nlvr2"
LXMERT_FIELDS = ("identifier", "img0", "img1", "sent")
LXMERT_HINT = ("Get LXMERT's processed NLVR2 files (data/nlvr2/*.json of airsplay/lxmert), or use "
               "dataset_config.nlvr2.demo=true for the bundled demo.")
ANNOTATION_HINT = ("Get NLVR2's data/{train,dev,test1}.json from https://github.com/lil-lab/nlvr (nlvr2/data), "
                   "or use dataset_config.nlvr2.demo=true for the bundled demo.")


@registry.register_builder(NAME)
class Nlvr2Builder(TaskBuilder):
    """Builds :class:`Nlvr2Dataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = NAME
    DEMO = nlvr2_demo
    SOURCES = ("txt_db", "annotations", "lxmert_json")

    def make_dataset(self, ctx: SplitContext, records: ExampleRecords) -> Nlvr2Dataset:
        return Nlvr2Dataset(
            self.dataset_name, ctx.split, ctx.cfg, records, ctx.img_dbs, use_img_type=bool(ctx.cfg.get("use_img_type", True)),
            lengths_include_cls_sep=bool(ctx.cfg.get("lengths_include_cls_sep", True)), num_dropped=ctx.filt.num_dropped,
        )

    def read_txt_db(self, ctx: SplitContext) -> ExampleRecords:
        txt_dbs = self.open_txt_dbs(ctx)
        records = ExampleRecords.for_txt_dbs(txt_dbs)
        for ex in self.txt_db_examples(ctx, txt_dbs):
            fnames = ex.img_fname()
            if isinstance(fnames, str) or len(fnames) != 2:
                raise DataError(f"{ex.where}: img_fname must list 2 image keys (left, right), got {fnames!r}")
            located = ctx.locate(fnames, ex.where)
            if located is not None:
                records.add(str(ex.key), ex.length, list(fnames), located, txt=ex)
        return records

    def read_annotations(self, ctx: SplitContext) -> ExampleRecords:
        tok = ctx.tokenizer()
        key_format = str(ctx.cfg.get("img_key_format", "nlvr2_{image_id}-img{side}.npz"))
        records = ExampleRecords.in_memory(tok)
        lines = self.annotation_lines(ctx, tok, ("identifier", "sentence"), "sentence", ANNOTATION_HINT)
        for path, number, ann, ids in lines:
            where = f"{path}, line {number} ({ann['identifier']})"
            target = parse_label(ann.get("label"), where)
            if ctx.filt.over_limit(len(ids)):
                continue
            image_id = str(ann["identifier"]).rsplit("-", 1)[0]
            keys = [image_key(key_format, image_id, side) for side in (0, 1)]
            located = ctx.locate(keys, where)
            if located is not None:
                records.add(str(ann["identifier"]), len(ids), keys, located, input_ids=ids, target=target)
        return records.drop_absent_targets()

    def read_lxmert_json(self, ctx: SplitContext) -> ExampleRecords:
        """LXMERT's NLVR2 records (see the module docstring); targets when every record has a ``label``."""
        tok = ctx.tokenizer()
        key_format = str(ctx.cfg.get("img_key_format", "nlvr2_{image_id}-img{side}.npz"))
        records = ExampleRecords.in_memory(tok)
        for path in ctx.paths("lxmert_json", "LXMERT NLVR2 JSON files"):
            items = read_lxmert_records(path, LXMERT_FIELDS, "NLVR2", LXMERT_HINT)
            wheres = [f"{path}, record {n} ({item['identifier']})" for n, item in enumerate(items)]
            targets = [parse_label(item.get("label"), where) for item, where in zip(items, wheres)]
            for item, where, target, ids in zip(items, wheres, targets, tok.encode_batch([i["sent"] for i in items])):
                if ctx.filt.over_limit(len(ids)):
                    continue
                image_id = str(item["identifier"]).rsplit("-", 1)[0]
                keys = [image_key(key_format, image_id, side, item[f"img{side}"]) for side in (0, 1)]
                located = ctx.locate(keys, where)
                if located is not None:
                    records.add(str(item["identifier"]), len(ids), keys, located, input_ids=ids, target=target)
        return records.drop_absent_targets()


def image_key(key_format: str, image_id: str, side: int, img_id: str = "") -> str:
    """An NLVR2 image's img_db key, e.g. ``nlvr2_dev-850-0-img1.npz`` (``img_id``: LXMERT's ``img0``/``img1``)."""
    try:
        return key_format.format(image_id=image_id, side=side, img_id=img_id or f"{image_id}-img{side}")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"dataset_config.nlvr2.img_key_format {key_format!r} cannot name image {image_id} "
                          f"side {side}: {err}. Use the fields {{image_id}} and {{side}} (or {{img_id}}).") from err
