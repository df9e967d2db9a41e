"""``run_type``: which phases a run performs (MMF semantics).

A run_type is one or more of ``train``, ``val``, ``test``, ``inference``, ``predict`` joined by
``_`` (``train_val``, ``train_inference``, ``val``, ``predict`` ...). It trains if it contains
``train``, evaluates the val split if it contains ``val``, and evaluates the test split if it
contains ``test``, ``inference`` or ``predict`` (``predict`` also writes predictions).
"""
from __future__ import annotations

from dataclasses import dataclass

from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import suggest

RUN_TYPE_PARTS = ("train", "val", "test", "inference", "predict")
EXAMPLES = ("train", "val", "test", "train_val", "predict", "train_inference", "train_val_test")


@dataclass(frozen=True)
class RunPhases:
    """What a run_type asks for."""

    train: bool
    val: bool
    test: bool
    predict: bool


def parse_run_type(run_type: str) -> RunPhases:
    """Validate ``run_type`` and return its phases; raises :class:`ConfigError` when malformed."""
    if not isinstance(run_type, str) or not run_type:
        raise ConfigError(f"run_type must be a string such as {', '.join(EXAMPLES)}; got {run_type!r}.")
    parts = run_type.split("_")
    bad = [p for p in parts if p not in RUN_TYPE_PARTS]
    if bad:
        hint = suggest(run_type, EXAMPLES) or suggest(bad[0], RUN_TYPE_PARTS)
        raise ConfigError(
            f'Invalid run_type "{run_type}": "{bad[0]}" is not one of {", ".join(RUN_TYPE_PARTS)} '
            f"(parts are joined with _, e.g. {', '.join(EXAMPLES)}).{hint}"
        )
    return RunPhases(
        train="train" in parts,
        val="val" in parts,
        test=any(p in parts for p in ("test", "inference", "predict")),
        predict="predict" in parts,
    )
