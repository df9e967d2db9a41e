"""One package per task (``villa_plugin/tasks/<task>/``): builder, dataset, head, metrics, demo
generator and ``defaults.yaml``, each registering itself.

Importing this package imports every task package in it (a package walk, alphabetical), so a new
task needs no line here or anywhere else: ``villa_plugin.components`` imports this package on the
first registry look-up. Each task package's ``__init__`` imports the modules that register.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import List


def task_packages() -> List[str]:
    """The names of the task packages under ``villa_plugin/tasks``."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)


for _name in task_packages():
    importlib.import_module(f"{__name__}.{_name}")
