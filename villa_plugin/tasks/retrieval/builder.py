"""Registered builder ``retrieval``: image-text retrieval on Flickr30k or COCO (Karpathy splits).

``corpus`` (``flickr30k`` | ``coco``) picks the block of per-corpus files (``dataset_config.retrieval.
<corpus>``). Sources (``source``):

- ``txt_db``: UNITER's ITM dbs (``txt_db/itm_flickr30k_{train,val,test}.db``, ``itm_coco_{train,
  restval,val,test}.db``): examples with ``input_ids`` and ``img_fname``, plus ``txt2img.json`` /
  ``img2txts.json``. ``txt_db.<split>`` and ``img_db.<split>`` are paired lists (txt_db[i] reads its
  images from img_db[i]; one img_db may serve all).
- ``karpathy_json``: the Karpathy-split file (``dataset_flickr30k.json`` / ``dataset_coco.json``:
  ``images`` with ``filename``, ``split``, ``sentences`` [{``raw``, ``tokens``, ``sentid``}] and, for
  COCO, ``filepath`` / ``cocoid``), tokenised with a local WordPiece ``vocab``. The Karpathy splits of
  each of our splits are ``karpathy_splits.<split>`` (COCO train = train + restval); each image's key
  is ``img_key_format`` filled with ``filename``, ``stem`` (file name without extension),
  ``imgid``, ``cocoid``, ``filepath`` and looked up in the split's img_dbs.

Splits: ``train`` gives query batches for hard-negative training (``negative_size`` sampled
negatives per query, of which the head keeps ``hard_neg_size``; ``directions``), ``val`` / ``test``
every (text, image) pair for R@1/5/10 (Flickr30k 1K / COCO 5K test images). Training drops texts
longer than ``max_txt_len`` (counted, logged); evaluation keeps them (counted, logged). Images
missing from the dbs (or with zero boxes) are an error naming the file and key, or with
``missing_images: skip`` dropped and counted. ``demo: true`` materialises the bundled demo
(``tasks/retrieval/demo.py``) and reads it with the configured ``source``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Tuple

import villa_plugin.tasks.retrieval.demo as retrieval_demo
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.base import BaseDataset
from villa_plugin.datasets.task_builder import SplitContext, TaskBuilder
from villa_plugin.datasets.task_common import choice, read_json, resolve_path
from villa_plugin.registry import registry
from villa_plugin.tasks.retrieval.dataset import RetrievalCorpus, RetrievalEvalDataset, RetrievalTrainDataset

logger = logging.getLogger(__name__)

NAME = "retrieval"
CORPORA = ("flickr30k", "coco")
DIRECTIONS = ("text", "image")
KARPATHY_HINT = ("Get the Karpathy splits (dataset_flickr30k.json / dataset_coco.json, "
                 "https://cs.stanford.edu/people/karpathy/deepimagesent/), or use dataset_config.retrieval.demo=true.")
# settings that may be given per corpus (dataset_config.retrieval.<corpus>.<key>) or at the top level
CORPUS_KEYS = ("txt_db", "img_db", "karpathy_json", "karpathy_splits", "img_key_format")


@registry.register_builder(NAME)
class RetrievalBuilder(TaskBuilder):
    """Builds :class:`RetrievalTrainDataset` (train) and :class:`RetrievalEvalDataset` (val/test)."""

    NAME = NAME
    DEMO = retrieval_demo
    SOURCES = ("txt_db", "karpathy_json")

    def settings(self) -> Dict[str, Any]:
        """The effective config: the corpus block merged over the top level, or the demo's files."""
        cfg = dict(self.cfg)
        corpus = choice(cfg, "corpus", CORPORA, self.dataset_name, "flickr30k")
        cfg = self.merge_block(cfg, corpus, CORPUS_KEYS)
        if cfg.get("demo"):
            p = self.materialise_demo()
            cfg.update(
                data_dir=p["root"], vocab=p["vocab"], lowercase=p["lowercase"], img_key_format=p["img_key_format"],
                karpathy_json=p["karpathy_json"], karpathy_splits=p["karpathy_splits"],
                txt_db={s: [v] for s, v in p["txt_db"].items()}, img_db={s: [p["img_db"]] for s in p["txt_db"]},
                **{k: p[k] for k in self.DEMO_FEATURE_KEYS},
            )
        return cfg

    # -- datasets -------------------------------------------------------------------------------
    def make_dataset(self, ctx: SplitContext, corpus: RetrievalCorpus) -> BaseDataset:
        """Training: query batches with sampled negatives; val / test: every (text, image) pair."""
        cfg = ctx.cfg
        logger.info("%s %s: %d texts, %d images (corpus %s, source %s)", self.dataset_name, ctx.split,
                    corpus.n_texts, corpus.n_images, cfg.get("corpus"), ctx.source)
        if ctx.training:
            directions = list(cfg.get("directions") or DIRECTIONS)
            if set(directions) - set(DIRECTIONS) or not directions:
                raise ConfigError(f"dataset_config.{self.dataset_name}.directions must be a non-empty subset of "
                                  f"{list(DIRECTIONS)}, got {directions}")
            return RetrievalTrainDataset(
                self.dataset_name, ctx.split, cfg, corpus, directions=directions,
                negative_size=_positive_int(cfg, "negative_size", 399, self.dataset_name),
                hard_neg_size=_positive_int(cfg, "hard_neg_size", 31, self.dataset_name),
                mining_chunk_size=_positive_int(cfg, "mining_chunk_size", 400, self.dataset_name),
                mining_warmup_batches=_non_negative_int(cfg, "mining_warmup_batches", 0, self.dataset_name),
                num_dropped=ctx.filt.num_dropped,
            )
        return RetrievalEvalDataset(
            self.dataset_name, ctx.split, cfg, corpus,
            feature_cache_images=_positive_int(cfg, "feature_cache_images", 8, self.dataset_name),
            corpus_name=str(cfg.get("corpus")), predict_top_k=_positive_int(cfg, "predict_top_k", 10, self.dataset_name),
            predict_score_matrix=bool(cfg.get("predict_score_matrix", False)), num_over_limit=ctx.filt.num_over_limit,
        )

    def read_txt_db(self, ctx: SplitContext) -> RetrievalCorpus:
        """UNITER's ITM txt_dbs, ``txt_db[i]`` paired with ``img_db[i]`` (or all with a single img_db)."""
        img_dbs = ctx.img_dbs
        txt_dbs = self.open_txt_dbs(ctx)
        if len(img_dbs) not in (1, len(txt_dbs)):
            raise ConfigError(f"{self.dataset_name} {ctx.split}: {len(txt_dbs)} txt_dbs need 1 or {len(txt_dbs)} "
                              f"img_dbs (paired in order), got {len(img_dbs)}")
        metas = {(t.cls_, t.sep) for t in txt_dbs}
        if len(metas) > 1:
            raise DataError(f"{self.dataset_name} {ctx.split}: txt_dbs {[t.db_dir for t in txt_dbs]} use different "
                            f"[CLS]/[SEP] ids; all must share one vocabulary.")
        images: Dict[Tuple[int, str], int] = {}
        cols: Dict[str, List] = {k: [] for k in ("text_ids", "text_img", "text_lens", "text_db_index")}
        image_keys: List[str] = []
        image_db: List[int] = []
        for ex in self.txt_db_examples(ctx, txt_dbs):
            d_idx = ex.db_index if len(img_dbs) > 1 else 0
            fname = ex.img_fname()
            if not isinstance(fname, str):
                raise DataError(f"{ex.where}: img_fname must be one image key, got {fname!r} (txt2img.json or the example)")
            if (d_idx, fname) not in images:
                if ctx.locate([fname], ex.where, dbs=[[img_dbs[d_idx]]]) is None:
                    continue
                images[(d_idx, fname)] = len(image_keys)
                image_keys.append(fname)
                image_db.append(d_idx)
            cols["text_ids"].append(str(ex.key))
            cols["text_img"].append(images[(d_idx, fname)])
            cols["text_lens"].append(ex.length)
            cols["text_db_index"].append(ex.db_index)
        return RetrievalCorpus(
            text_ids=cols["text_ids"], text_img=cols["text_img"], text_lens=cols["text_lens"],
            image_ids=list(image_keys), image_keys=image_keys, image_db=image_db, img_dbs=img_dbs,
            cls_id=txt_dbs[0].cls_, sep_id=txt_dbs[0].sep, txt_dbs=txt_dbs, text_db_index=cols["text_db_index"],
        )

    def read_karpathy_json(self, ctx: SplitContext) -> RetrievalCorpus:
        """A Karpathy-split file, tokenised here; the images of ``karpathy_splits.<split>``."""
        cfg, split, filt, img_dbs = ctx.cfg, ctx.split, ctx.filt, ctx.img_dbs
        path = resolve_path(cfg, cfg.get("karpathy_json"), self.dataset_name, "karpathy_json")
        data = read_json(path, KARPATHY_HINT)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{path} has no 'images' list; is it a Karpathy-split file (dataset_flickr30k.json)? {KARPATHY_HINT}")
        wanted = (cfg.get("karpathy_splits") or {}).get(split)
        wanted = [wanted] if isinstance(wanted, str) else list(wanted or [split])
        tok = ctx.tokenizer()
        key_format = str(cfg.get("img_key_format", "flickr30k_{stem:0>12}.npz"))
        cols: Dict[str, List] = {k: [] for k in ("text_ids", "text_img", "text_lens", "input_ids")}
        image_ids, image_keys, image_db = [], [], []
        for n, img in enumerate(data["images"]):
            if img.get("split") not in wanted:
                continue
            where = f"{path}, images[{n}] ({img.get('filename', '?')})"
            sentences = img.get("sentences")
            if not isinstance(sentences, list) or "filename" not in img:
                raise DataError(f"{where}: a Karpathy image needs 'filename' and a 'sentences' list. {KARPATHY_HINT}")
            key = karpathy_image_key(key_format, img, where)
            located = ctx.locate([key], where)
            if located is None:
                continue
            texts = [s.get("raw") if s.get("raw") is not None else " ".join(s.get("tokens") or []) for s in sentences]
            kept = []
            for s, ids in zip(sentences, tok.encode_batch(texts)):
                if filt.over_limit(len(ids)):
                    continue
                kept.append((s.get("sentid", f"{img['filename']}#{len(kept)}"), ids))
            if not kept:
                continue
            j = len(image_keys)
            image_ids.append(img["cocoid"] if "cocoid" in img else img["filename"])
            image_keys.append(key)
            image_db.append(located[0])
            for sent_id, ids in kept:
                cols["text_ids"].append(sent_id)
                cols["text_img"].append(j)
                cols["text_lens"].append(len(ids))
                cols["input_ids"].append(ids)
        if not image_keys:
            raise DataError(f"{path}: no image of Karpathy split(s) {wanted} is usable for {self.dataset_name} {split} "
                            f"({dict(filt.dropped)} dropped). Check karpathy_splits and img_key_format.")
        return RetrievalCorpus(
            text_ids=cols["text_ids"], text_img=cols["text_img"], text_lens=cols["text_lens"], image_ids=image_ids,
            image_keys=image_keys, image_db=image_db, img_dbs=img_dbs, cls_id=tok.token_to_id("[CLS]"),
            sep_id=tok.token_to_id("[SEP]"), input_ids=cols["input_ids"],
        )


def karpathy_image_key(key_format: str, image: Dict[str, Any], where: str) -> str:
    """The img_db key of a Karpathy image: ``key_format`` filled with ``filename``, ``stem``,
    ``imgid``, ``cocoid``, ``filepath`` (e.g. ``flickr30k_{stem:0>12}.npz`` ->
    ``flickr30k_001000092795.npz``; ``coco_{filepath}_{cocoid:012d}.npz``)."""
    filename = str(image.get("filename", ""))
    fields = {"filename": filename, "stem": os.path.splitext(filename)[0], "imgid": image.get("imgid"),
              "cocoid": image.get("cocoid"), "filepath": image.get("filepath")}
    try:
        return key_format.format(**fields)
    except (KeyError, IndexError, ValueError, TypeError) as err:
        raise ConfigError(
            f"dataset_config.retrieval.img_key_format {key_format!r} cannot name the image of {where}: {err}. "
            f"Use the fields {{filename}}, {{stem}}, {{imgid}}, {{cocoid}}, {{filepath}}."
        ) from err


def _non_negative_int(cfg: Dict[str, Any], key: str, default: int, dataset: str) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"dataset_config.{dataset}.{key} must be an integer >= 0, got {value!r}")
    return int(value)


def _positive_int(cfg: Dict[str, Any], key: str, default: int, dataset: str) -> int:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dataset_config.{dataset}.{key} must be a positive integer, got {value!r}")
    return int(value)


__all__ = ["RetrievalBuilder", "karpathy_image_key"]
