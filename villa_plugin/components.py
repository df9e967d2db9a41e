"""Imports every built-in module that registers components.

The registry imports this module lazily on the first look-up, so ``import villa_plugin`` stays
cheap. Add one import line per registering module (keep the list sorted by package). Tasks are not
listed one by one: ``villa_plugin.tasks`` imports every task package it holds.
"""
# isort: off
import villa_plugin.losses  # noqa: F401
import villa_plugin.metrics  # noqa: F401
import villa_plugin.optim  # noqa: F401
import villa_plugin.distributed  # noqa: F401
import villa_plugin.adversarial.losses  # noqa: F401
import villa_plugin.models.registered  # noqa: F401
import villa_plugin.backbones.lxmert.task_model  # noqa: F401  (model lxmert, its heads, bert_adam)
import villa_plugin.tasks  # noqa: F401  (every task package: builders, heads, metrics, task losses)
import villa_plugin.trainers  # noqa: F401
import villa_plugin.trainers.villa_free_at  # noqa: F401
# isort: on
