"""Fixtures for the config tests: a throw-away bundled root and test-only registered components."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from villa_plugin.config import paths
from villa_plugin.datasets.base import BaseDatasetBuilder
from villa_plugin.models.base_model import BaseModel
from villa_plugin.registry import registry

TINY_DEFAULTS = """
includes: []
model: null
datasets: []
run_type: train_val
env:
  save_dir: ./save
  user_dir: ""
training:
  trainer: tst_trainer
  seed: 1
  max_updates: 10
  lr: 0.1
  fp16: false
  name: base
  a: 0
  b: 0
  c: 0
  d: 0
  betas: [0.9, 0.98]
  steps: ${training.max_updates}
  extra: null
optimizer:
  lr_multipliers: {}
model_config: {}
dataset_config: {}
"""


def _write(path: Path, text: str) -> Path:
    """Write dedented YAML text, creating parent folders; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _isolation(monkeypatch):
    """No plugin from the environment, and registry tables restored after each test."""
    monkeypatch.delenv("MMF_USER_DIR", raising=False)
    registry.names("model")  # load the built-ins now, so the snapshot includes them
    saved = {kind: dict(table) for kind, table in registry._tables.items()}
    yield
    for kind, table in registry._tables.items():
        table.clear()
        table.update(saved[kind])


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """A fake bundled root (tiny configs/defaults.yaml) that paths.bundled_root() returns."""
    root = tmp_path / "bundled"
    _write(root / "configs" / "defaults.yaml", TINY_DEFAULTS)
    monkeypatch.setattr(paths, "bundled_root", lambda: root)
    return root


def _register_model(name: str, yaml_path=None):
    """Register a test model whose config_path() is ``yaml_path`` (None: no YAML)."""

    class _Model(BaseModel):
        @classmethod
        def config_path(cls):
            return None if yaml_path is None else str(yaml_path)

    _Model.__qualname__ = f"TestModel_{name}"
    registry.register_model(name, override=True)(_Model)
    return _Model


def _register_builder(name: str, yaml_path=None):
    """Register a test dataset builder whose config_path() is ``yaml_path``."""

    class _Builder(BaseDatasetBuilder):
        @classmethod
        def config_path(cls):
            return None if yaml_path is None else str(yaml_path)

    _Builder.__qualname__ = f"TestBuilder_{name}"
    registry.register_builder(name, override=True)(_Builder)
    return _Builder


class Helpers:
    """Test helpers handed out by the ``h`` fixture (conftest modules are not importable)."""

    write = staticmethod(_write)
    register_model = staticmethod(_register_model)
    register_builder = staticmethod(_register_builder)


@pytest.fixture
def h():
    return Helpers
