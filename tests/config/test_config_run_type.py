"""run_type: MMF semantics and validation."""
from __future__ import annotations

import pytest

from villa_plugin.common.errors import ConfigError
from villa_plugin.config.run_type import RunPhases, parse_run_type


@pytest.mark.parametrize(
    "run_type, phases",
    [
        ("train", (True, False, False, False)),
        ("val", (False, True, False, False)),
        ("test", (False, False, True, False)),
        ("train_val", (True, True, False, False)),
        ("train_inference", (True, False, True, False)),
        ("inference", (False, False, True, False)),
        ("predict", (False, False, True, True)),
        ("train_val_test", (True, True, True, False)),
    ],
)
def test_phases(run_type, phases):
    assert parse_run_type(run_type) == RunPhases(*phases)


@pytest.mark.parametrize("bad", ["", "training", "train-val", "train__val", "all", None, 3])
def test_invalid_run_types(bad):
    with pytest.raises(ConfigError, match="run_type"):
        parse_run_type(bad)


def test_suggestion_for_typo():
    with pytest.raises(ConfigError, match='Did you mean "train_val"'):
        parse_run_type("trian_val")
