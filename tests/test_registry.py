"""The registry: built-ins loaded only after a successful import, base classes checked at registration."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from villa_plugin.datasets.base import BaseDatasetBuilder
from villa_plugin.models.base_model import BaseModel
from villa_plugin.registry import Registry, RegistryError, registry
from villa_plugin.trainers.base_trainer import MMFTrainer


def test_a_failed_builtin_import_is_retried_not_forgotten():
    """On a fresh interpreter, the first look-up's import of the built-ins fails once (as with a
    missing dependency); the next look-up must import them again and find "villa"."""
    script = textwrap.dedent("""
        import importlib.abc, sys
        from villa_plugin.registry import registry

        class FailOnce(importlib.abc.MetaPathFinder):
            failed = False
            def find_spec(self, name, path=None, target=None):
                if name == "villa_plugin.models.registered" and not FailOnce.failed:
                    FailOnce.failed = True
                    raise ImportError("simulated missing dependency")
                return None

        sys.meta_path.insert(0, FailOnce())
        try:
            registry.get_model_class("villa")
        except ImportError as error:
            print("first:", error)
        print("second:", registry.get_model_class("villa").__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "first: simulated missing dependency" in done.stdout
    assert "second: VILLA" in done.stdout


@pytest.mark.parametrize("kind, base", [("model", "BaseModel"), ("builder", "BaseDatasetBuilder"),
                                        ("trainer", "MMFTrainer"), ("callback", "Callback"),
                                        ("strategy", "Strategy"), ("metric", "BaseMetric")])
def test_a_class_of_the_wrong_base_is_refused_at_registration(kind, base):
    local = Registry(builtins_module=None)

    class NotAComponent:
        pass

    with pytest.raises(RegistryError, match=rf'{kind} "x": class .*NotAComponent does not subclass .*\.{base}\. Derive it from {base}'):
        local.register_component(kind, "x", NotAComponent)
    with pytest.raises(RegistryError, match="does not subclass"):
        local.register_component(kind, "y", lambda config: None)
    assert "x" not in local._tables[kind]


def test_subclasses_register_and_other_kinds_take_anything():
    local = Registry(builtins_module=None)
    local.register_model("m")(type("M", (BaseModel,), {}))
    local.register_builder("b")(type("B", (BaseDatasetBuilder,), {}))
    local.register_trainer("t")(type("T", (MMFTrainer,), {}))
    local.register_loss("l")(lambda output, batch: 0)  # losses may be plain callables
    assert local.names("model") == ["m"] and local.names("loss") == ["l"]
    assert set(registry.names("trainer")) >= {"mmf", "villa_free_at"}  # the built-ins pass the check
