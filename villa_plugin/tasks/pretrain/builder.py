"""Pre-training builders: ``pretrain_coco``, ``pretrain_vg`` (in-domain), ``pretrain_cc``, ``pretrain_sbu``
(out-of-domain). One class; the name picks the corpus's defaults (``defaults.yaml`` beside this file).

A split is a :class:`~villa_plugin.datasets.task_mixture.TaskMixture`: one
:class:`~villa_plugin.tasks.pretrain.dataset.PretrainTaskDataset` per task of ``tasks``, weighted by
``mix_ratio`` (paired by position, the official config's ``tasks`` / ``mix_ratio``). Sources:

- ``txt_db``: UNITER's released pre-training dbs (``pretrain_coco_train.db`` ...): ``input_ids`` (no
  specials), ``img_fname``, and ``meta.json`` with ``CLS`` / ``SEP`` / ``MASK`` / ``v_range``;
  ``txt_db.<split>[i]`` reads its images from ``img_db.<split>[i]`` (one img_db may serve all).
- ``captions_json``: COCO-captions JSON (``{"images": [{id, file_name}], "annotations": [{image_id,
  caption}]}``) tokenised with the local WordPiece ``vocab``; each image key is ``img_key_format``
  filled with ``image_id``, ``file_name``, ``file_stem`` and ``file_stem_lower`` (default
  ``{file_stem_lower}.npz``: ``COCO_train2014_000000000009.jpg`` -> UNITER's
  ``coco_train2014_000000000009.npz``), looked up in the split's img_dbs.

MRC / MRC-kl need ``soft_labels`` in every img_db of the split: a DataError names the db and the key.
``demo: true`` uses the bundled generated captions + regions (tasks/pretrain/demo.py).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import villa_plugin.tasks.pretrain.demo as pretrain_demo
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.task_builder import ExampleRecords, SplitContext, TaskBuilder
from villa_plugin.datasets.task_common import read_json
from villa_plugin.datasets.task_mixture import TaskMixture
from villa_plugin.registry import registry
from villa_plugin.tasks.pretrain.dataset import PretrainCorpus, PretrainTaskDataset, check_mix
from villa_plugin.tasks.pretrain.masking import TextSpecials

CORPORA = ("coco", "vg", "cc", "sbu")
JSON_HINT = ("Use the COCO captions JSON format ({'images': [{'id', 'file_name'}], 'annotations': "
             "[{'image_id', 'caption'}]}), or dataset_config.<name>.demo=true for the bundled demo.")


class PretrainBuilder(TaskBuilder):
    """Builds the :class:`TaskMixture` of a pre-training corpus (see the module docstring)."""

    NAME = "pretrain_coco"
    DEMO = pretrain_demo
    SOURCES = ("txt_db", "captions_json")
    SPLITS = ("train", "val")
    DEMO_PER_SPLIT = ("txt_db", "img_db")

    def demo_settings(self, paths: Dict[str, Any]) -> Dict[str, Any]:
        settings = super().demo_settings(paths)
        settings["captions"] = {s: [v["captions"]] for s, v in paths["splits"].items()}
        return settings

    def _key(self, key: str) -> str:
        return f"dataset_config.{self.dataset_name}.{key}"

    def make_dataset(self, ctx: SplitContext, records: ExampleRecords) -> TaskMixture:
        cfg, specials = ctx.cfg, ctx.extra["specials"]
        mix = check_mix(cfg.get("tasks"), cfg.get("mix_ratio"), f"dataset_config.{self.dataset_name}")
        corpus = PretrainCorpus(self.dataset_name, ctx.split, records, ctx.img_dbs, specials)
        options = dict(with_ot=bool(cfg.get("itm_ot", True)), mlm_prob=float(cfg.get("mlm_prob", 0.15)),
                       mrm_prob=float(cfg.get("mrm_prob", 0.15)), itm_neg_prob=float(cfg.get("itm_neg_prob", 0.5)))
        views = {task: PretrainTaskDataset(corpus, task, cfg, **options) for task, _ in mix}
        return TaskMixture(self.dataset_name, ctx.split, views, dict(mix))

    # -- sources --------------------------------------------------------------------------------
    def read_txt_db(self, ctx: SplitContext) -> ExampleRecords:
        """UNITER's pre-training txt_dbs, ``txt_db[i]`` paired with ``img_db[i]`` (or one img_db for all)."""
        txt_dbs = self.open_txt_dbs(ctx)
        specials = {self._specials(db.meta, db.db_dir) for db in txt_dbs}
        if len(specials) > 1:
            raise DataError(f"{self.dataset_name} {ctx.split}: txt_dbs {[t.db_dir for t in txt_dbs]} have different "
                            f"CLS/SEP/MASK/v_range in their meta.json ({sorted(map(str, specials))}); all must share "
                            f"one tokenizer.")
        records = ExampleRecords.for_txt_dbs(txt_dbs)
        for ex, img, pair in self.paired_txt_db_examples(ctx, txt_dbs):
            records.add(ex.key, ex.length, img, pair, txt=ex)
        ctx.extra["specials"] = specials.pop()
        return records

    def read_captions_json(self, ctx: SplitContext) -> ExampleRecords:
        """COCO-captions JSON + the split's img_dbs (see the module docstring)."""
        tok = ctx.tokenizer()
        key_format = str(ctx.cfg.get("img_key_format") or "{file_stem_lower}.npz")
        records = ExampleRecords.in_memory(tok)
        for path in ctx.paths("captions", "caption files"):
            data = read_json(path, JSON_HINT)
            if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
                raise DataError(f"{path} has no 'annotations' list. {JSON_HINT}")
            images = {img["id"]: img for img in data.get("images") or [] if isinstance(img, dict) and "id" in img}
            anns = data["annotations"]
            for n, ann in enumerate(anns):
                if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                    raise DataError(f"{path}, annotation {n}: needs 'image_id' and 'caption'. {JSON_HINT}")
            for n, (ann, ids) in enumerate(zip(anns, tok.encode_batch([a["caption"] for a in anns]))):
                where = f"{path}, annotation {ann.get('id', n)}"
                if not ids:
                    ctx.filt.drop("empty_caption", where)
                    continue
                if ctx.filt.over_limit(len(ids)):
                    continue
                key = caption_image_key(key_format, ann["image_id"], images.get(ann["image_id"]), where)
                located = ctx.locate([key], where)
                if located is not None:
                    records.add(ann.get("id", f"{os.path.basename(path)}:{n}"), len(ids), key, located[0],
                                input_ids=ids, target=None)
        ctx.extra["specials"] = self._specials(tok.meta("captions"), ctx.cfg.get("vocab"))
        return records

    @staticmethod
    def _specials(meta: Dict[str, Any], where: Any) -> TextSpecials:
        missing = [k for k in ("CLS", "SEP", "MASK", "v_range") if meta.get(k) is None]
        if missing:
            raise DataError(f"{where}: the tokenizer meta has no {missing}; pre-training (MLM) needs [CLS], [SEP], "
                            f"[MASK] and v_range (UNITER's txt_db meta.json holds them).")
        return TextSpecials(int(meta["CLS"]), int(meta["SEP"]), int(meta["MASK"]), tuple(int(v) for v in meta["v_range"]))


def caption_image_key(key_format: str, image_id: Any, image: Any, where: str) -> str:
    """The img_db key of a caption's image from ``img_key_format``."""
    file_name = str((image or {}).get("file_name", ""))
    if not file_name and any(f in key_format for f in ("{file_name", "{file_stem")):
        raise DataError(f"{where}: image {image_id} is not in the file's 'images' list (no file_name for "
                        f"img_key_format {key_format!r}). {JSON_HINT}")
    stem = os.path.splitext(file_name)[0]
    try:
        return key_format.format(image_id=image_id, file_name=file_name, file_stem=stem, file_stem_lower=stem.lower())
    except (KeyError, ValueError, IndexError) as err:
        raise ConfigError(f"img_key_format {key_format!r} cannot name image {image_id} ({where}): {err}. Use the "
                          f"fields {{image_id}}, {{file_name}}, {{file_stem}}, {{file_stem_lower}}.") from err


def _register(corpus: str) -> type:
    name = f"pretrain_{corpus}"
    cls = type(f"Pretrain{corpus.upper()}Builder", (PretrainBuilder,), {"NAME": name, "__module__": __name__})
    return registry.register_builder(name)(cls)


BUILDERS: List[type] = [_register(corpus) for corpus in CORPORA]

__all__ = ["PretrainBuilder", "BUILDERS", "CORPORA", "caption_image_key"]
