"""Command-line parsing: forms, value decoding, key paths."""
from __future__ import annotations

import pytest

from villa_plugin.common.errors import ConfigError
from villa_plugin.config.overrides import parse_argv, parse_datasets, parse_key, parse_value


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("3", 3),
        ("-1", -1),
        ("1e-3", 1e-3),
        ("True", True),
        ("false", False),
        ("None", None),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ("0.9,0.98", [0.9, 0.98]),
        ("[text, image]", ["text", "image"]),
        ("{head: 10}", {"head": 10}),
        ("'quoted'", "quoted"),
        ("vqa2", "vqa2"),
        ("./save/run 1", "./save/run 1"),
        ("${training.max_updates}", "${training.max_updates}"),
        ("[unclosed", "[unclosed"),
    ],
)
def test_parse_value(raw, expected):
    assert parse_value(raw) == expected


def test_parse_key_with_list_indices():
    assert parse_key("a.b[2].c") == ("a", "b", 2, "c")
    assert parse_key("a[0][1]") == ("a", 0, 1)
    for bad in ("a..b", "a.b[x]", "a[", ".a"):
        with pytest.raises(ConfigError, match="Malformed"):
            parse_key(bad)


def test_parse_argv_forms():
    args = parse_argv(
        ["config=x.yaml", "model=villa", "dataset=vqa2", "training.seed", "3", "run_type=val", "k=a=b"]
    )
    assert args.config == "x.yaml"
    assert [(o.key, o.value) for o in args.overrides] == [
        ("model", "villa"),
        ("datasets", ["vqa2"]),
        ("training.seed", 3),
        ("run_type", "val"),
        ("k", "a=b"),  # only the first = splits
    ]
    assert args.value_of("model") == "villa" and args.has("datasets") and not args.has("config")
    assert "on the command line (training.seed=3)" == args.overrides[2].source


def test_old_pair_form_for_config():
    assert parse_argv(["config", "y.yaml"]).config == "y.yaml"


def test_empty_key_rejected():
    with pytest.raises(ConfigError, match="empty key"):
        parse_argv(["=3"])


@pytest.mark.parametrize(
    "raw, expected",
    [("a", ["a"]), ("a,b", ["a", "b"]), ("a, b,", ["a", "b"]), ("[a, b]", ["a", "b"]), ("", []), (None, [])],
)
def test_parse_datasets(raw, expected):
    assert parse_datasets(raw) == expected


def test_parse_datasets_rejects_non_names():
    with pytest.raises(ConfigError, match="datasets must be"):
        parse_datasets("[1, 2]")
