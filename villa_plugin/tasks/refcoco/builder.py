"""Registered builder ``refcoco``: referring expressions on RefCOCO, RefCOCO+ or RefCOCOg.

``variant`` (``refcoco`` | ``refcoco+`` | ``refcocog``; ``refcoco_plus`` also accepted) picks the
block of per-variant files (``dataset_config.refcoco.<refcoco|refcoco_plus|refcocog>``). Our splits
map onto the variant's: ``train`` -> train, ``val`` -> ``val_split`` (val), ``test`` ->
``test_split`` (RefCOCO/RefCOCO+: testA, or testB; RefCOCOg: test).

Region stores: ``train_boxes`` (gt) for training, ``boxes`` (``gt`` | ``det``) for val/test, each an
img_db under ``img_db.<gt|det>`` with keys ``img_key_format.<gt|det>`` filled with ``image_id``
(UNITER: ``re_coco_gt`` / ``re_coco_det``, ``visual_grounding_coco_gt_{image_id:012d}.npz`` /
``visual_grounding_det_coco_{image_id:012d}.npz``).

Sources (``source``):

- ``txt_db``: UNITER's RE dbs (``txt_db/<variant>_<split>.db``): examples with ``sent_id``,
  ``ref_id``, ``ann_id``, ``image_id``, ``bbox`` (x, y, w, h), ``input_ids``, plus the side files
  ``refs.json``, ``annotations.json`` and ``images.json`` (``id``, ``height``, ``width``,
  ``ann_ids``). Without the side files every example is read once at build time; image sizes then
  come from ``instances_json``.
- ``refer_json``: the refer toolkit's files as JSON: ``refs_json`` (the list in ``refs(unc).p`` /
  ``refs(umd).p``: ``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences`` [{``sent_id``,
  ``sent``}]) and ``instances_json`` (COCO-style ``images`` with ``width`` / ``height`` and
  ``annotations`` with ``id``, ``image_id``, ``bbox``), tokenised with a local WordPiece ``vocab``.
  The ``.p`` pickles are never unpickled: convert them to JSON first (the error says how).

Training drops expressions longer than ``max_txt_len`` (counted, logged); evaluation keeps them
(counted, logged). Missing images (or images with zero boxes) are an error naming the file and key,
or with ``missing_images: skip`` dropped and counted. ``demo: true`` materialises the bundled demo
(``tasks/refcoco/demo.py``) and reads it with the configured ``source``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Tuple

import villa_plugin.tasks.refcoco.demo as refcoco_demo
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.task_builder import SplitContext, TaskBuilder, TxtDbExample
from villa_plugin.datasets.task_common import choice, open_img_db, read_json, resolve_path
from villa_plugin.datasets.text import TxtDB
from villa_plugin.registry import registry
from villa_plugin.tasks.refcoco.dataset import RefcocoDataset, RefcocoRecords

logger = logging.getLogger(__name__)

NAME = "refcoco"
VARIANTS = {"refcoco": "refcoco", "refcoco+": "refcoco_plus", "refcoco_plus": "refcoco_plus", "refcocog": "refcocog"}
VARIANT_SPLITS = {"refcoco": ("train", "val", "testA", "testB"), "refcoco_plus": ("train", "val", "testA", "testB"),
                  "refcocog": ("train", "val", "test")}
DEFAULT_TEST_SPLIT = {"refcoco": "testA", "refcoco_plus": "testA", "refcocog": "test"}
VARIANT_KEYS = ("txt_db", "refs_json", "instances_json")
REFER_HINT = ("The refer toolkit's files come from https://github.com/lichengunc/refer (data/<variant>/refs(unc).p, "
              "instances.json); use dataset_config.refcoco.demo=true for the bundled demo.")


def pickle_error(path: str) -> DataError:
    """The error for a refer ``.p`` file: this plugin never unpickles data files."""
    json_path = os.path.splitext(path)[0] + ".json"
    return DataError(
        f"{path} is a Python pickle (the refer toolkit's refs file). This plugin does not unpickle data files, "
        f"since unpickling can run arbitrary code. Convert it once, in an environment you trust, with: "
        f"python -c \"import json, pickle; json.dump(pickle.load(open('{path}', 'rb')), open('{json_path}', 'w'))\" "
        f"and set dataset_config.refcoco.<variant>.refs_json to {json_path}."
    )


def read_refs(path: str) -> List[Dict[str, Any]]:
    """The refs list of a refer JSON file (pickles refused with conversion instructions)."""
    if path.endswith(".p") or path.endswith(".pkl"):
        raise pickle_error(path)
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            if fh.read(1) == b"\x80":  # pickle protocol >= 2 header
                raise pickle_error(path)
    refs = read_json(path, REFER_HINT)
    if not isinstance(refs, list) or (refs and not isinstance(refs[0], dict)):
        raise DataError(f"{path} must hold a list of refs (ref_id, ann_id, image_id, split, sentences). {REFER_HINT}")
    return refs


@registry.register_builder(NAME)
class RefcocoBuilder(TaskBuilder):
    """Builds :class:`RefcocoDataset` splits (``train`` / ``val`` / ``test``) from config."""

    NAME = NAME
    DEMO = refcoco_demo
    SOURCES = ("txt_db", "refer_json")

    def settings(self) -> Dict[str, Any]:
        """The effective config: the variant block merged over the top level, or the demo's files."""
        cfg = dict(self.cfg)
        variant = str(cfg.get("variant", "refcoco"))
        if variant not in VARIANTS:
            raise ConfigError(f"dataset_config.{self.dataset_name}.variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        block_name = VARIANTS[variant]
        cfg = self.merge_block(cfg, block_name, VARIANT_KEYS)
        if cfg.get("demo"):
            p = self.materialise_demo()
            cfg.update(data_dir=p["root"], vocab=p["vocab"], lowercase=p["lowercase"], txt_db=p["txt_db"],
                       refs_json=p["refs_json"], instances_json=p["instances_json"], img_db=p["img_db"],
                       img_key_format=p["img_key_format"], **{k: p[k] for k in self.DEMO_FEATURE_KEYS})
            block_name = p["variant"]
        cfg["_variant"] = block_name
        return cfg

    def variant_split(self, cfg: Dict[str, Any], split: str) -> str:
        """The variant's split behind our ``train`` / ``val`` / ``test``."""
        variant = cfg["_variant"]
        if split == "train":
            name = "train"
        elif split == "val":
            name = cfg.get("val_split") or "val"
        else:
            name = cfg.get("test_split") or DEFAULT_TEST_SPLIT[variant]
        if name not in VARIANT_SPLITS[variant]:
            raise ConfigError(f"dataset_config.{self.dataset_name}: {variant} has splits {list(VARIANT_SPLITS[variant])}; "
                              f"got {name!r} for our {split} split (val_split / test_split)")
        return name

    # -- datasets -------------------------------------------------------------------------------
    def filter_label(self, cfg: Dict[str, Any], split: str) -> str:
        return f"{split} ({self.variant_split(cfg, split)})"

    def open_image_dbs(self, cfg: Dict[str, Any], split: str):
        """One store: the gt-box or the detected-box img_db (``train_boxes`` / ``boxes``)."""
        boxes = self._boxes(cfg, split)
        return [open_img_db(resolve_path(cfg, (cfg.get("img_db") or {}).get(boxes), self.dataset_name, f"img_db.{boxes}"), cfg)]

    def _boxes(self, cfg: Dict[str, Any], split: str) -> str:
        return choice(cfg, "train_boxes" if split == "train" else "boxes", ("gt", "det"), self.dataset_name, "gt")

    def _key_format(self, ctx: SplitContext) -> str:
        boxes = self._boxes(ctx.cfg, ctx.split)
        key_format = str((ctx.cfg.get("img_key_format") or {}).get(boxes) or "")
        if not key_format:
            raise ConfigError(f"dataset_config.{self.dataset_name}.img_key_format.{boxes} is not set")
        return key_format

    def make_dataset(self, ctx: SplitContext, records: RefcocoRecords) -> RefcocoDataset:
        boxes = self._boxes(ctx.cfg, ctx.split)
        if boxes != "gt":  # ann_ids give the region order of the gt-box store only
            records.image_ann_ids = {}
        return RefcocoDataset(
            self.dataset_name, ctx.split, ctx.cfg, records, ctx.img_dbs[0],
            target_min_iou=float(ctx.cfg.get("target_min_iou", 0.5)), variant=ctx.cfg["_variant"],
            source_split=self.variant_split(ctx.cfg, ctx.split), boxes=boxes, num_dropped=ctx.filt.num_dropped,
        )

    def _read_instances(self, cfg: Dict[str, Any]) -> Tuple[Dict[Any, Tuple[float, float]], Dict[Any, List[float]]]:
        """``({image_id: (W, H)}, {ann_id: [x, y, w, h]})`` from ``instances_json``."""
        path = resolve_path(cfg, cfg.get("instances_json"), self.dataset_name, "instances_json")
        data = read_json(path, REFER_HINT)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{path} has no 'images' list; is it the refer toolkit's instances.json? {REFER_HINT}")
        sizes = {img["id"]: (float(img["width"]), float(img["height"])) for img in data["images"]}
        return sizes, {ann["id"]: ann["bbox"] for ann in data.get("annotations") or []}

    def _usable(self, ctx: SplitContext, key_format: str, where: str, image_id: Any, bbox: Any, tlen: int):
        """The image key of an expression within the length limit whose image is there, else None."""
        if ctx.filt.over_limit(tlen):
            return None
        key = _image_key(key_format, image_id, where)
        if ctx.locate([key], where) is None:
            return None
        if bbox is None or len(bbox) != 4:
            raise DataError(f"{where}: the referred object's bbox must be [x, y, w, h], got {bbox!r}")
        return key

    def read_txt_db(self, ctx: SplitContext) -> RefcocoRecords:
        """UNITER's RE txt_db of the variant's split, with its side files (refs, annotations, images)."""
        cfg, name = ctx.cfg, self.variant_split(ctx.cfg, ctx.split)
        key_format = self._key_format(ctx)
        per_split = cfg.get("txt_db") or {}
        path = per_split.get(name) if isinstance(per_split, dict) else None
        if isinstance(path, list):
            if len(path) != 1:
                raise ConfigError(f"dataset_config.{self.dataset_name}.txt_db.{name} must name one txt_db, got {path}")
            path = path[0]
        db = TxtDB(resolve_path(cfg, path, self.dataset_name, f"txt_db.{name}"), -1)
        side = {n: os.path.join(db.db_dir, f"{n}.json") for n in ("refs", "annotations", "images")}
        images = {img["id"]: img for img in read_json(side["images"])} if os.path.isfile(side["images"]) else {}
        if images:
            sizes = {i: (float(img["width"]), float(img["height"])) for i, img in images.items()}
            image_ann_ids = {i: list(img["ann_ids"]) for i, img in images.items() if "ann_ids" in img}
        elif cfg.get("instances_json"):
            sizes, image_ann_ids = self._read_instances(cfg)[0], {}  # regions are then matched by IoU
        else:
            raise DataError(f"txt_db {db.db_dir} has no images.json (UNITER's image sizes and ann_ids) and "
                            f"dataset_config.{self.dataset_name}.instances_json is not set: the image sizes are needed "
                            f"to place the regions' boxes. Add one of them.")
        records = RefcocoRecords.for_txt_dbs([db], image_ann_ids=image_ann_ids)
        for sent_id, rec in self._txt_db_records(db, side):
            where = f'txt_db {db.db_dir}, sent_id "{sent_id}"'
            if str(sent_id) not in db.id2len:
                raise DataError(f"{where}: listed in refs.json but missing from id2len.json / the LMDB")
            image_id = rec["image_id"]
            if image_id not in sizes:
                raise DataError(f"{where}: image {image_id} has no size in images.json / instances_json")
            tlen = db.id2len[str(sent_id)]
            key = self._usable(ctx, key_format, where, image_id, rec.get("bbox"), tlen)
            if key is not None:
                records.add_expression(rec.get("sent_id", sent_id), rec.get("ref_id"), rec.get("ann_id"), image_id,
                                       rec.get("bbox"), sizes[image_id], tlen, key, txt=TxtDbExample(0, db, str(sent_id), tlen))
        return records

    def _txt_db_records(self, db: TxtDB, side: Dict[str, str]) -> List[Tuple[Any, Dict[str, Any]]]:
        """``(sent_id, {ref_id, ann_id, image_id, bbox})`` in refs order (UNITER's ``_get_sent_ids``),
        from the side files, or from the examples themselves when refs/annotations are absent."""
        if os.path.isfile(side["refs"]) and os.path.isfile(side["annotations"]):
            anns = {a["id"]: a for a in read_json(side["annotations"])}
            out = []
            for ref in read_json(side["refs"]):
                ann = anns.get(ref["ann_id"])
                if ann is None:
                    raise DataError(f"{side['refs']}: ref {ref.get('ref_id')} names ann_id {ref['ann_id']}, which "
                                    f"{side['annotations']} lacks")
                for sent_id in ref["sent_ids"]:
                    out.append((sent_id, {"sent_id": sent_id, "ref_id": ref["ref_id"], "ann_id": ref["ann_id"],
                                          "image_id": ref["image_id"], "bbox": ann["bbox"]}))
            return out
        out = []
        for key in db.id2len:
            ex = db[key]
            missing = [f for f in ("ann_id", "image_id", "bbox") if f not in ex]
            if missing:
                raise DataError(f'txt_db {db.db_dir}, example "{key}": missing field(s) {missing} (an RE example has '
                                f"sent_id, ref_id, ann_id, image_id, bbox, input_ids)")
            out.append((key, ex))
        return out

    def read_refer_json(self, ctx: SplitContext) -> RefcocoRecords:
        """The refer toolkit's refs (JSON) + instances.json, tokenised here; regions matched by IoU."""
        cfg, name = ctx.cfg, self.variant_split(ctx.cfg, ctx.split)
        key_format = self._key_format(ctx)
        refs_path = resolve_path(cfg, cfg.get("refs_json"), self.dataset_name, "refs_json")
        refs = read_refs(refs_path)
        sizes, boxes = self._read_instances(cfg)
        tok = ctx.tokenizer()
        # the refer files do not fix the order of a store's regions: targets are matched by IoU
        records = RefcocoRecords.in_memory(tok)
        chosen = [r for r in refs if r.get("split") == name]
        sentences = [(n, r, s) for n, r in enumerate(refs) if r.get("split") == name for s in r.get("sentences") or []]
        if chosen and not sentences:
            raise DataError(f"{refs_path}: the {name} refs have no 'sentences'. {REFER_HINT}")
        texts = [s.get("sent") if s.get("sent") is not None else s.get("raw", "") for _, _, s in sentences]
        for (n, ref, sent), ids in zip(sentences, tok.encode_batch(texts)):
            where = f"{refs_path}, refs[{n}] (ref_id {ref.get('ref_id')}, sent_id {sent.get('sent_id')})"
            for field in ("ann_id", "image_id"):
                if field not in ref:
                    raise DataError(f"{where}: missing field '{field}'. {REFER_HINT}")
            if ref["image_id"] not in sizes:
                raise DataError(f"{where}: image {ref['image_id']} is not in the images of {cfg.get('instances_json')}")
            if ref["ann_id"] not in boxes:
                raise DataError(f"{where}: ann_id {ref['ann_id']} is not in the annotations of {cfg.get('instances_json')}")
            key = self._usable(ctx, key_format, where, ref["image_id"], boxes[ref["ann_id"]], len(ids))
            if key is not None:
                records.add_expression(sent.get("sent_id"), ref.get("ref_id"), ref["ann_id"], ref["image_id"],
                                       boxes[ref["ann_id"]], sizes[ref["image_id"]], len(ids), key, input_ids=ids)
        return records


def _image_key(key_format: str, image_id: Any, where: str) -> str:
    try:
        return key_format.format(image_id=int(image_id))
    except (KeyError, IndexError, ValueError, TypeError) as err:
        raise ConfigError(f"dataset_config.refcoco.img_key_format {key_format!r} cannot name image {image_id!r} of "
                          f"{where}: {err}. Use the field {{image_id}}.") from err


__all__ = ["RefcocoBuilder", "read_refs", "pickle_error"]
