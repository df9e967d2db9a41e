"""The part every task builder shares: a plain-dict config, its bundled defaults YAML, and the
generated demo data that ``demo: true`` materialises under ``demo_dir``."""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Dict, Optional

from villa_plugin.common.errors import ConfigError
from villa_plugin.config.paths import bundled_path
from villa_plugin.datasets.base import BaseDatasetBuilder
from villa_plugin.datasets.task_common import as_plain_dict


class DemoBackedBuilder(BaseDatasetBuilder):
    """Subclasses set ``NAME`` (registry name), ``CONFIG_DIR`` (``configs/datasets/<dir>``) and
    ``DEMO`` (a module with ``materialise_demo(root) -> paths``)."""

    NAME: str = ""
    CONFIG_DIR: str = ""
    DEMO: Optional[ModuleType] = None

    def __init__(self, dataset_name: Optional[str] = None, config: Any = None):
        super().__init__(dataset_name or self.NAME, config)
        self.cfg = as_plain_dict(config)

    @classmethod
    def config_path(cls) -> Optional[str]:
        return bundled_path(f"configs/datasets/{cls.CONFIG_DIR}/defaults.yaml")

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
