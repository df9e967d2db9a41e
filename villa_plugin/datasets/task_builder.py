"""The one builder base every task uses: :class:`TaskBuilder`.

``build_dataset(split)`` is the same for every task:

1. ``settings()``: the dataset config as a plain dict, pointed at the bundled demo's files when
   ``demo: true`` (``demo_settings``);
2. ``open_split(cfg, split)`` -> :class:`SplitContext`: the split checked, the ``source`` and the
   ``missing_images`` policy (``error`` | ``skip``) read, an :class:`ExampleFilter` for the text
   length limit, the split's image dbs opened (``open_image_dbs``);
3. ``read_<source>(ctx)`` -> the task's typed records (a dataclass such as :class:`ExampleRecords`
   with ``__len__``): one reader per source name, all with this one signature;
4. an error when no example is left, one logged summary of what was kept and dropped;
5. ``make_dataset(ctx, records)`` -> the task's dataset.

A task sets ``NAME`` (its registry name), ``DEMO`` (a module with ``materialise_demo(root) ->
paths``), ``SOURCES`` (the accepted ``source`` values, the first the default) and implements the
readers and ``make_dataset``. Its defaults are the ``defaults.yaml`` beside its builder module
(``villa_plugin/tasks/<task>/defaults.yaml``).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from types import ModuleType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.common.input_spec import InputSpec, Size
from villa_plugin.datasets.base import BaseDataset, BaseDatasetBuilder
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_common import (
    IMG_DB_KEYS,
    ExampleFilter,
    as_plain_dict,
    check_image,
    check_split,
    choice,
    open_img_db,
    read_jsonl,
    resolve_path,
    split_paths,
)
from villa_plugin.datasets.text import TxtDB, WordPieceTokenizer

MISSING_IMAGE_POLICIES = ("error", "skip")


@dataclasses.dataclass
class SplitContext:
    """One split being built: what every source reader gets."""

    dataset: str
    split: str
    cfg: Dict[str, Any]
    source: str
    policy: str  # missing_images: error | skip
    filt: ExampleFilter
    img_dbs: List[ImgFeatDB]
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # what a task opens besides (VCR's gt dbs)
    vocab: Optional[Size] = None  # the token vocabulary's size (set by tokenizer() / open_txt_dbs())

    @property
    def training(self) -> bool:
        return self.split == "train"

    def paths(self, key: str, what: str) -> List[str]:
        """The resolved ``cfg[key][split]`` list; a ConfigError when it is empty."""
        paths = split_paths(self.cfg, key, self.split, self.dataset)
        if not paths:
            raise ConfigError(f"dataset_config.{self.dataset}.{key}.{self.split} lists no {what}")
        return paths

    def tokenizer(self) -> WordPieceTokenizer:
        """The WordPiece tokenizer of ``vocab`` / ``lowercase`` (annotation sources)."""
        tok = WordPieceTokenizer(resolve_path(self.cfg, self.cfg.get("vocab"), self.dataset, "vocab"),
                                 lowercase=bool(self.cfg.get("lowercase", False)))
        self.vocab = Size(tok.vocab_size, f"dataset_config.{self.dataset}.vocab", tok.vocab_path)
        return tok

    def locate(self, keys: Sequence[str], where: str, dbs: Optional[Sequence[Sequence[ImgFeatDB]]] = None):
        """The db index of each image key (``dbs[i]`` searched for ``keys[i]``; by default the split's
        image dbs for every key), or None when one is missing and the policy is ``skip`` (counted)."""
        located = []
        for n, key in enumerate(keys):
            index = check_image(self.img_dbs if dbs is None else dbs[n], key, where, self.filt, self.policy)
            if index is None:
                return None
            located.append(index)
        return located


@dataclasses.dataclass
class TxtDbExample:
    """One example of a txt_db (within the length limit): the db, its index, the key and length."""

    db_index: int
    db: TxtDB
    key: str
    length: int

    @property
    def where(self) -> str:
        return f'txt_db {self.db.db_dir}, example "{self.key}"'

    def img_fname(self) -> Any:
        """The example's image key(s): ``txt2img.json`` or the example's ``img_fname``."""
        fname = self.db.txt2img.get(self.key) or self.db[self.key].get("img_fname")
        if fname is None:
            raise DataError(f"{self.where}: no image key (neither txt2img.json nor the example's img_fname has one)")
        return fname


@dataclasses.dataclass
class ExampleRecords:
    """The kept examples of a split as columns (one entry per example; cheap to fork into workers).

    Text comes from memory (``input_ids`` / ``targets``, annotation sources) or is read per item
    from ``txt_dbs`` (``txt_db_index`` + ``txt_keys``). ``img_keys`` / ``img_db_index`` hold one
    key and db index per example, or a sequence of them for tasks with several images.
    """

    cls_id: int
    sep_id: int
    ids: List[Any] = dataclasses.field(default_factory=list)
    txt_lens: List[int] = dataclasses.field(default_factory=list)
    img_keys: List[Any] = dataclasses.field(default_factory=list)
    img_db_index: List[Any] = dataclasses.field(default_factory=list)
    input_ids: Optional[List[List[int]]] = None
    targets: Optional[List[Any]] = None
    txt_dbs: Optional[List[TxtDB]] = None
    txt_db_index: Optional[List[int]] = None
    txt_keys: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, example_id: Any, txt_len: int, img_key: Any, img_db_index: Any, *, input_ids=None,
            target=None, txt: Optional[TxtDbExample] = None) -> None:
        """Append one example (``txt`` for txt_db examples, ``input_ids`` / ``target`` otherwise)."""
        self.ids.append(example_id)
        self.txt_lens.append(int(txt_len))
        self.img_keys.append(img_key)
        self.img_db_index.append(img_db_index)
        if txt is not None:
            self.txt_db_index.append(txt.db_index)
            self.txt_keys.append(txt.key)
        else:
            self.input_ids.append(input_ids)
            self.targets.append(target)

    @classmethod
    def for_txt_dbs(cls, txt_dbs: List[TxtDB], **extra: Any) -> "ExampleRecords":
        """Empty records reading their text from ``txt_dbs`` (which share [CLS] / [SEP])."""
        return cls(cls_id=txt_dbs[0].cls_, sep_id=txt_dbs[0].sep, txt_dbs=txt_dbs, txt_db_index=[], txt_keys=[],
                   **extra)

    @classmethod
    def in_memory(cls, tok: WordPieceTokenizer, **extra: Any) -> "ExampleRecords":
        """Empty records holding their text in memory (tokenised with ``tok``)."""
        return cls(cls_id=tok.token_to_id("[CLS]"), sep_id=tok.token_to_id("[SEP]"), input_ids=[], targets=[],
                   **extra)

    def drop_absent_targets(self) -> "ExampleRecords":
        """No ``targets`` at all when no example is labelled (an unlabelled split)."""
        if self.targets is not None and all(t is None for t in self.targets):
            self.targets = None
        return self


class TaskBuilder(BaseDatasetBuilder):
    """The base of every task builder (see the module docstring)."""

    NAME: str = ""
    DEMO: Optional[ModuleType] = None
    SOURCES: Tuple[str, ...] = ("txt_db", "annotations")
    SPLITS: Tuple[str, ...] = ("train", "val", "test")
    DEFAULT_MAX_TXT_LEN = 60
    DEMO_PER_SPLIT = ("txt_db", "annotations", "img_db")  # demo paths()["splits"][split][key]
    DEMO_FEATURE_KEYS = IMG_DB_KEYS

    def __init__(self, dataset_name: Optional[str] = None, config: Any = None):
        super().__init__(dataset_name or self.NAME, config)
        self.cfg = as_plain_dict(config)

    @classmethod
    def config_path(cls) -> Optional[str]:
        return os.path.join(os.path.dirname(os.path.abspath(sys.modules[cls.__module__].__file__)), "defaults.yaml")

    # -- demo -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.cfg.get("demo"):
            self.materialise_demo()

    def materialise_demo(self) -> Dict[str, Any]:
        """Write the demo (idempotent) under ``demo_dir`` and return its file paths."""
        demo_dir = self.cfg.get("demo_dir")
        if not demo_dir:
            raise ConfigError(
                f"dataset_config.{self.dataset_name}.demo=true needs dataset_config.{self.dataset_name}.demo_dir"
            )
        return self.DEMO.materialise_demo(os.path.expanduser(str(demo_dir)))

    # -- the effective config -------------------------------------------------------------------
    def settings(self) -> Dict[str, Any]:
        """The effective config: the configured one, or pointed at the demo's files when ``demo`` is on."""
        cfg = dict(self.cfg)
        if cfg.get("demo"):
            cfg.update(self.demo_settings(self.materialise_demo()))
        return cfg

    def demo_settings(self, paths: Dict[str, Any]) -> Dict[str, Any]:
        """Config entries for the demo's files (the common demo layout: per-split path lists)."""
        return dict(
            data_dir=paths["root"], vocab=paths["vocab"], lowercase=paths["lowercase"],
            img_key_format=paths["img_key_format"],
            **{key: {s: [v[key]] for s, v in paths["splits"].items()} for key in self.DEMO_PER_SPLIT},
            **{key: paths[key] for key in self.DEMO_FEATURE_KEYS},
        )

    def merge_block(self, cfg: Dict[str, Any], block_name: str, keys: Sequence[str]) -> Dict[str, Any]:
        """``cfg`` with the set keys of its ``block_name`` mapping (a corpus or variant block) on top."""
        block = cfg.get(block_name) or {}
        if not isinstance(block, Mapping):
            raise ConfigError(f"dataset_config.{self.dataset_name}.{block_name} must be a mapping of its own settings")
        return dict(cfg, **{key: block[key] for key in keys if block.get(key) is not None})

    # -- building a split -----------------------------------------------------------------------
    def build_dataset(self, split: str) -> BaseDataset:
        ctx = self.open_split(self.settings(), split)
        reader = getattr(self, f"read_{ctx.source}")
        records = reader(ctx)
        if not len(records):
            raise DataError(f"{self.dataset_name} {ctx.filt.split}: no examples left ({dict(ctx.filt.dropped)} dropped)")
        ctx.filt.log(len(records))
        dataset = self.make_dataset(ctx, records)
        dataset.input_spec = self.input_spec(ctx, records)
        return dataset

    def input_spec(self, ctx: SplitContext, records: Any) -> InputSpec:
        """What the split feeds a model (checked against the model at set-up): its token ids (the
        ids held in memory, else the txt_db's vocabulary) and the region-feature width; a task whose
        targets have a configured width adds it."""
        return InputSpec(vocab_size=token_ids_used(ctx.vocab, records),
                         feature_dim=feature_width(ctx.img_dbs, self.dataset_name, ctx.split))

    def open_split(self, cfg: Dict[str, Any], split: str) -> SplitContext:
        """The split's :class:`SplitContext` (see the module docstring)."""
        check_split(split, self.dataset_name, self.SPLITS)
        source = choice(cfg, "source", self.SOURCES, self.dataset_name, self.SOURCES[0])
        policy = choice(cfg, "missing_images", MISSING_IMAGE_POLICIES, self.dataset_name, "error")
        max_txt_len = int(cfg.get("max_txt_len", self.DEFAULT_MAX_TXT_LEN))
        filt = ExampleFilter(self.dataset_name, self.filter_label(cfg, split), max_txt_len, training=split == "train")
        return SplitContext(self.dataset_name, split, cfg, source, policy, filt, self.open_image_dbs(cfg, split))

    def filter_label(self, cfg: Dict[str, Any], split: str) -> str:
        """How the split is named in the kept/dropped summary (refcoco adds its variant's split)."""
        return split

    def open_image_dbs(self, cfg: Dict[str, Any], split: str) -> List[ImgFeatDB]:
        """The split's image dbs: every path of ``img_db.<split>``."""
        img_paths = split_paths(cfg, "img_db", split, self.dataset_name)
        if not img_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.img_db.{split} lists no image dbs")
        return [open_img_db(p, cfg) for p in img_paths]

    def make_dataset(self, ctx: SplitContext, records: Any) -> BaseDataset:
        raise NotImplementedError

    # -- what readers share ---------------------------------------------------------------------
    def open_txt_dbs(self, ctx: SplitContext, db_class: Type[TxtDB] = TxtDB) -> List[TxtDB]:
        """The split's txt_dbs (``txt_db.<split>``); the length filter is applied by
        :meth:`txt_db_examples`, so every example is listed here."""
        txt_dbs = [db_class(p, -1) for p in ctx.paths("txt_db", "txt_dbs")]
        sizes = [Size(int(db.v_range[1]), os.path.join(db.db_dir, "meta.json"), "v_range: the vocabulary it was tokenised with")
                 for db in txt_dbs if isinstance(db.v_range, (list, tuple)) and len(db.v_range) == 2]
        ctx.vocab = max(sizes, key=lambda size: size.value, default=None)
        return txt_dbs

    def annotation_lines(self, ctx: SplitContext, tok: WordPieceTokenizer, required: Sequence[str], text_field: str,
                         hint: str) -> Iterator[Tuple[str, int, Dict[str, Any], List[int]]]:
        """``(path, line number, annotation, token ids of its text_field)`` for every line of the split's
        JSON-lines ``annotations`` files; a line without a ``required`` field is a DataError naming it."""
        for path in ctx.paths("annotations", "annotation files"):
            lines = list(read_jsonl(path, hint))
            for number, ann in lines:
                missing = [f for f in required if f not in ann]
                if missing:
                    raise DataError(f"{path}, line {number}: a {self.dataset_name} example needs {missing}. {hint}")
            for (number, ann), ids in zip(lines, tok.encode_batch([ann[text_field] for _, ann in lines])):
                yield path, number, ann, ids

    def paired_txt_db_examples(self, ctx: SplitContext, txt_dbs: Sequence[TxtDB]) -> Iterator[Tuple[TxtDbExample, Any, int]]:
        """``(example, image key, img_db index)`` of every kept txt_db example whose image is found, with
        ``txt_db[i]`` paired with ``img_db[i]`` (or every txt_db with a single img_db)."""
        if len(ctx.img_dbs) not in (1, len(txt_dbs)):
            raise ConfigError(f"{self.dataset_name} {ctx.split}: {len(txt_dbs)} txt_dbs need 1 or {len(txt_dbs)} "
                              f"img_dbs (paired in order), got {len(ctx.img_dbs)}")
        for ex in self.txt_db_examples(ctx, txt_dbs):
            pair = ex.db_index if len(ctx.img_dbs) > 1 else 0
            img = ex.img_fname()
            if ctx.locate([img], ex.where, dbs=[[ctx.img_dbs[pair]]]) is not None:
                yield ex, img, pair

    @staticmethod
    def txt_db_examples(ctx: SplitContext, txt_dbs: Sequence[TxtDB]) -> Iterator[TxtDbExample]:
        """Every txt_db example the length filter keeps (over-long ones counted in ``ctx.filt``)."""
        for db_index, db in enumerate(txt_dbs):
            for key, length in db.id2len.items():
                if ctx.filt.over_limit(length):
                    continue
                yield TxtDbExample(db_index, db, key, int(length))


def token_ids_used(vocab: Optional[Size], records: Any) -> Optional[Size]:
    """``vocab`` narrowed to the ids the examples use (highest id + 1) when they are held in memory
    (tokenised from annotations): a vocabulary with unused ids beyond the model's rows still fits."""
    ids = getattr(records, "input_ids", None)
    if vocab is None or not ids:
        return vocab
    top = max([max(x) for x in ids if len(x)] + [int(records.cls_id), int(records.sep_id)])
    return Size(top + 1, vocab.where, f"{vocab.detail}, {vocab.value} tokens; the highest id used is {top}")


def feature_width(img_dbs: Sequence[ImgFeatDB], dataset: str, split: str) -> Optional[Size]:
    """The region-feature width of a split's image dbs (None when none can tell); dbs of different
    widths are a DataError naming two of them."""
    widths = [(db.feature_dim(), db) for db in img_dbs]
    widths = [(dim, db) for dim, db in widths if dim is not None]
    if not widths:
        return None
    first_dim, first_db = widths[0]
    for dim, db in widths[1:]:
        if dim != first_dim:
            raise DataError(f"{dataset} {split}: img_db {first_db.img_dir} holds {first_dim}-d features but "
                            f"{db.img_dir} holds {dim}-d ones; one model takes one feature width.")
    return Size(first_dim, f"img_db {first_db.img_dir}")


__all__ = ["TaskBuilder", "feature_width", "token_ids_used", "SplitContext", "ExampleRecords", "TxtDbExample", "MISSING_IMAGE_POLICIES"]
