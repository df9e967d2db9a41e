"""The part every task builder shares: a plain-dict config, its bundled defaults YAML, and the
generated demo data that ``demo: true`` materialises under ``demo_dir``."""
from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any, Dict, Optional, Tuple

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.base import BaseDatasetBuilder
from villa_plugin.datasets.task_common import ExampleFilter, as_plain_dict, check_split, choice, open_img_db, split_paths


class TaskBuilder(BaseDatasetBuilder):
    """Subclasses set ``NAME`` (registry name) and ``DEMO`` (a module with
    ``materialise_demo(root) -> paths``); their defaults are the ``defaults.yaml`` beside the
    builder's module (``villa_plugin/tasks/<task>/defaults.yaml``)."""

    NAME: str = ""
    DEMO: Optional[ModuleType] = None

    def __init__(self, dataset_name: Optional[str] = None, config: Any = None):
        super().__init__(dataset_name or self.NAME, config)
        self.cfg = as_plain_dict(config)

    @classmethod
    def config_path(cls) -> Optional[str]:
        return os.path.join(os.path.dirname(os.path.abspath(sys.modules[cls.__module__].__file__)), "defaults.yaml")

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

    # -- the effective config -----------------------------------------------------------------
    DEMO_PER_SPLIT = ("txt_db", "annotations", "img_db")  # demo paths()["splits"][split][key]
    DEMO_FEATURE_KEYS = ("conf_th", "max_bb", "min_bb", "num_bb", "compressed")

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

    def open_split(self, cfg: Dict[str, Any], split: str, sources: Tuple[str, ...]):
        """The common start of ``build_dataset``: ``(source, missing-image policy, ExampleFilter,
        the split's image dbs)``."""
        check_split(split, self.dataset_name)
        source = choice(cfg, "source", sources, self.dataset_name, sources[0])
        policy = choice(cfg, "missing_images", ("error", "skip"), self.dataset_name, "error")
        filt = ExampleFilter(self.dataset_name, split, int(cfg.get("max_txt_len", 60)), training=split == "train")
        img_paths = split_paths(cfg, "img_db", split, self.dataset_name)
        if not img_paths:
            raise ConfigError(f"dataset_config.{self.dataset_name}.img_db.{split} lists no image dbs")
        return source, policy, filt, [open_img_db(p, cfg) for p in img_paths]

    def read_columns(self, cfg: Dict[str, Any], split: str, source: str, img_dbs, filt, policy: str,
                     count_key: str) -> Dict[str, Any]:
        """Columns from ``_from_txt_db`` or ``_from_annotations`` (by ``source``); an error when
        filtering left no example, else one logged summary of what was kept and dropped."""
        reader = self._from_txt_db if source == "txt_db" else self._from_annotations
        columns = reader(cfg, split, img_dbs, filt, policy)
        if not columns[count_key]:
            raise DataError(f"{self.dataset_name} {split}: no examples left ({dict(filt.dropped)} dropped)")
        filt.log(len(columns[count_key]))
        return columns
