"""Feature-extraction backends, chosen by name (``--backend`` or ``backend:`` in the YAML).

A backend is an ``nn.Module`` with

- ``preprocess`` (a picklable callable, run in DataLoader workers): PIL RGB image -> model input;
- ``extract(inputs: list) -> list[Regions]``: one :class:`~villa_plugin.features.regions.Regions` per image;
- ``has_vg_classes``: whether ``soft_labels`` / objects / attributes are Visual Genome predictions.

Each is built by ``build(options: dict, weights: str)`` where ``weights`` is a file or ``"random"``.
"""
from __future__ import annotations

from typing import Callable, Dict

from villa_plugin.common.errors import ConfigError

BACKENDS: Dict[str, Callable] = {}


def register_backend(name: str):
    """Decorator: ``@register_backend("grid")`` on a ``build(options, weights)`` function."""

    def wrap(fn):
        if name in BACKENDS:
            raise ValueError(f"feature backend {name!r} is registered twice")
        BACKENDS[name] = fn
        return fn

    return wrap


def build_backend(name: str, options: dict, weights: str):
    """The backend ``name`` built with ``options`` (its keys are checked by the backend)."""
    from villa_plugin.features.backends import butd, grid, torchvision_frcnn  # noqa: F401  (registration)

    if name not in BACKENDS:
        raise ConfigError(f"Unknown feature backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}.")
    return BACKENDS[name](dict(options or {}), weights)


def check_options(backend: str, options: dict, defaults: dict) -> dict:
    """``defaults`` updated with ``options``; an unknown key is an error listing the known ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"Unknown option(s) {', '.join(unknown)} for feature backend {backend!r}; "
                          f"known: {', '.join(sorted(defaults))}.")
    return {**defaults, **options}
