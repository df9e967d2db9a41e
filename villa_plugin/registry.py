"""MMF-compatible registry: components are registered by kind and looked up by name.

Usage mirrors MMF::

    from villa_plugin.registry import registry

    @registry.register_model("my_model")
    class MyModel(BaseModel): ...

    registry.get_model_class("my_model")

Unlike MMF, an unknown name raises :class:`RegistryError` listing what is registered and the
closest match, registering a name twice is an error unless ``override=True``, and a class
registered under a kind with a base class (model, builder, trainer, callback, strategy, metric)
must subclass it.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, Optional

KINDS = (
    "model",
    "builder",
    "trainer",
    "loss",
    "metric",
    "processor",
    "callback",
    "optimizer",
    "scheduler",
    "strategy",
    "head",
)

# The class a registered component of a kind must subclass ("module:qualname", resolved lazily:
# the base modules import this one).
BASE_CLASSES = {
    "model": "villa_plugin.models.base_model:BaseModel",
    "builder": "villa_plugin.datasets.base:BaseDatasetBuilder",
    "trainer": "villa_plugin.trainers.base_trainer:MMFTrainer",
    "callback": "villa_plugin.trainers.callbacks:Callback",
    "strategy": "villa_plugin.distributed.base:Strategy",
    "metric": "villa_plugin.metrics:BaseMetric",
}
BUILTINS_MODULE = "villa_plugin.components"

_MISSING = object()


class RegistryError(KeyError):
    """Raised for unknown names and duplicate registrations."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def suggest(name: str, candidates) -> str:
    """Return ' Did you mean "x"?' for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f' Did you mean "{close[0]}"?' if close else ""


class Registry:
    """One name -> object table per component kind, plus a generic key/value store."""

    def __init__(self, builtins_module: Optional[str] = BUILTINS_MODULE) -> None:
        self._tables: Dict[str, Dict[str, Any]] = {kind: {} for kind in KINDS}
        self._state: Dict[str, Any] = {}
        self._builtins_module = builtins_module
        self._builtins_loaded = builtins_module is None
        self._builtins_loading = False

    # -- generic registration -------------------------------------------------------------
    def register_component(self, kind: str, name: str, obj: Any, override: bool = False) -> Any:
        table = self._table(kind)
        _check_base_class(kind, name, obj)
        if name in table and table[name] is not obj and not override and not _same_definition(table[name], obj):
            raise RegistryError(
                f'{kind} "{name}" is already registered ({_describe(table[name])}). '
                f"Pick another name, or pass override=True to replace it on purpose."
            )
        table[name] = obj
        return obj

    def get_component(self, kind: str, name: str) -> Any:
        self._ensure_builtins_loaded()
        table = self._table(kind)
        if name not in table:
            known = ", ".join(sorted(table)) or "(none)"
            raise RegistryError(
                f'Unknown {kind} "{name}".{suggest(name, table)} Registered {kind}s: {known}. '
                f"If it lives in your own package, point env.user_dir (or MMF_USER_DIR) at it."
            )
        return table[name]

    def names(self, kind: str):
        self._ensure_builtins_loaded()
        return sorted(self._table(kind))

    def _ensure_builtins_loaded(self) -> None:
        """Import the package's own components, so look-ups see every built-in name.

        Marked done only once the import succeeded: after a failed import (a missing dependency,
        say) the next look-up tries again and raises the same error, instead of reporting the
        names that happened to register before the failure.
        """
        if self._builtins_loaded or self._builtins_loading:
            return
        self._builtins_loading = True  # look-ups made while importing see the partial tables
        try:
            importlib.import_module(self._builtins_module)
            self._builtins_loaded = True
        finally:
            self._builtins_loading = False

    def _table(self, kind: str) -> Dict[str, Any]:
        if kind not in self._tables:
            raise RegistryError(f'Unknown registry kind "{kind}".{suggest(kind, KINDS)}')
        return self._tables[kind]

    def _decorator(self, kind: str, name: str, override: bool) -> Callable[[Any], Any]:
        def wrap(obj: Any) -> Any:
            return self.register_component(kind, name, obj, override=override)

        return wrap

    # -- MMF's decorator names ------------------------------------------------------------
    def register_model(self, name: str, override: bool = False):
        return self._decorator("model", name, override)

    def register_builder(self, name: str, override: bool = False):
        return self._decorator("builder", name, override)

    def register_trainer(self, name: str, override: bool = False):
        return self._decorator("trainer", name, override)

    def register_loss(self, name: str, override: bool = False):
        return self._decorator("loss", name, override)

    def register_metric(self, name: str, override: bool = False):
        return self._decorator("metric", name, override)

    def register_processor(self, name: str, override: bool = False):
        return self._decorator("processor", name, override)

    def register_callback(self, name: str, override: bool = False):
        return self._decorator("callback", name, override)

    def register_optimizer(self, name: str, override: bool = False):
        return self._decorator("optimizer", name, override)

    def register_scheduler(self, name: str, override: bool = False):
        return self._decorator("scheduler", name, override)

    def register_strategy(self, name: str, override: bool = False):
        return self._decorator("strategy", name, override)

    def register_head(self, name: str, override: bool = False):
        return self._decorator("head", name, override)

    # -- MMF's look-up names --------------------------------------------------------------
    def get_model_class(self, name: str):
        return self.get_component("model", name)

    def get_builder_class(self, name: str):
        return self.get_component("builder", name)

    def get_trainer_class(self, name: str):
        return self.get_component("trainer", name)

    def get_loss_class(self, name: str):
        return self.get_component("loss", name)

    def get_metric_class(self, name: str):
        return self.get_component("metric", name)

    def get_processor_class(self, name: str):
        return self.get_component("processor", name)

    def get_callback_class(self, name: str):
        return self.get_component("callback", name)

    def get_optimizer_class(self, name: str):
        return self.get_component("optimizer", name)

    def get_scheduler_class(self, name: str):
        return self.get_component("scheduler", name)

    def get_strategy_class(self, name: str):
        return self.get_component("strategy", name)

    def get_head_class(self, name: str):
        return self.get_component("head", name)

    # -- generic state store (MMF's registry.register / registry.get) ---------------------
    def register(self, key: str, obj: Any) -> Any:
        self._state[key] = obj
        return obj

    def get(self, key: str, default: Any = _MISSING, no_warning: bool = True) -> Any:
        if key in self._state:
            return self._state[key]
        if default is _MISSING:
            raise RegistryError(f'Nothing registered under key "{key}".{suggest(key, self._state)}')
        return default

    def unregister(self, key: str) -> Any:
        return self._state.pop(key, None)


def _describe(obj: Any) -> str:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", type(obj).__name__)
    return f"{module}.{qualname}"


def _same_definition(old: Any, new: Any) -> bool:
    """True for the same class defined again by a module imported a second time (a retried
    import of the built-ins after a failure re-runs the module that failed)."""
    return isinstance(old, type) and isinstance(new, type) and _describe(old) == _describe(new)


def _check_base_class(kind: str, name: str, obj: Any) -> None:
    """A class registered under ``kind`` must subclass the kind's base class (BASE_CLASSES)."""
    path = BASE_CLASSES.get(kind)
    if path is None:
        return
    module_name, qualname = path.split(":")
    if isinstance(obj, type) and f"{obj.__module__}:{obj.__qualname__}" == path:
        return  # the base class itself (e.g. the `mmf` trainer), registered while its module loads
    base = getattr(importlib.import_module(module_name), qualname)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        what = f"class {_describe(obj)}" if isinstance(obj, type) else f"{type(obj).__name__} {obj!r}"
        raise RegistryError(
            f'Cannot register {kind} "{name}": {what} does not subclass {module_name}.{qualname}. '
            f"Derive it from {qualname} (from {module_name} import {qualname})."
        )


registry = Registry()
