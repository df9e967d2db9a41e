"""Parse ``mmf_run``'s command line into the experiment file and a list of key overrides.

Accepted forms (MMF's)::

    config=projects/villa/vqa.yaml  model=villa  dataset=vqa2  datasets=vqa2,vg
    run_type=train_val  training.max_updates=100  optimizer.params.betas[1]=0.999
    training.seed 7                 (the older ``key value`` pair form)
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

import yaml

from villa_plugin.common.errors import ConfigError

# Keys the command line may name without a dotted path and that get special treatment.
DATASETS_ALIASES = ("dataset", "datasets")

_SEGMENT = re.compile(r"^(?P<name>[^.\[\]]+)(?P<indices>(\[-?\d+\])*)$")
_INDEX = re.compile(r"\[(-?\d+)\]")

PathSegment = Union[str, int]


@dataclass
class Override:
    """One ``key=value`` from the command line: the parsed path, value and the original text."""

    key: str
    path: Tuple[PathSegment, ...]
    value: Any
    raw_value: str

    @property
    def source(self) -> str:
        return f"on the command line ({self.key}={self.raw_value})"


@dataclass
class ParsedArgs:
    """The experiment YAML named by ``config=`` (if any) and the ordered overrides."""

    config: Optional[str] = None
    overrides: List[Override] = field(default_factory=list)

    def value_of(self, key: str, default: Any = None) -> Any:
        """Value of the last override of a top-level ``key`` (later arguments win)."""
        for override in reversed(self.overrides):
            if override.path == (key,):
                return override.value
        return default

    def has(self, key: str) -> bool:
        return any(override.path == (key,) for override in self.overrides)


def parse_argv(argv: List[str]) -> ParsedArgs:
    """Split ``argv`` into ``config=`` and ordered overrides (``key=value`` or ``key value``)."""
    parsed = ParsedArgs()
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if "=" in token:
            key, raw = token.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(
                    f'Command-line option "{token}" has no value. Write key=value '
                    f"(e.g. {token}=...) or the older form `{token} <value>`."
                )
            key, raw = token, tokens[i + 1]
            i += 2
        key = key.strip()
        if key.startswith("--"):  # tolerate `--key=value`, a common slip
            key = key[2:]
        if not key:
            raise ConfigError(f'Command-line option "{token}" has an empty key; write key=value.')
        if key == "config":
            parsed.config = raw
            continue
        if key in DATASETS_ALIASES:
            parsed.overrides.append(Override("datasets", ("datasets",), parse_datasets(raw), raw))
            continue
        parsed.overrides.append(Override(key, parse_key(key), parse_value(raw), raw))
    return parsed


def parse_key(key: str) -> Tuple[PathSegment, ...]:
    """``"a.b[2].c"`` -> ``("a", "b", 2, "c")``."""
    path: List[PathSegment] = []
    for part in key.split("."):
        match = _SEGMENT.match(part)
        if match is None:
            raise ConfigError(
                f'Malformed command-line key "{key}": use dotted names such as training.batch_size, '
                f"and [N] for list items (e.g. optimizer.params.betas[1])."
            )
        path.append(match.group("name"))
        path.extend(int(i) for i in _INDEX.findall(match.group("indices")))
    return tuple(path)


def parse_value(raw: str) -> Any:
    """Decode a command-line value: a Python literal when possible, else YAML-ish, else a string.

    ``3`` -> 3, ``1e-3`` -> 0.001, ``True`` / ``true`` -> True, ``None`` / ``null`` -> None,
    ``[a, b]`` -> ["a", "b"], ``0.9,0.98`` -> [0.9, 0.98], anything else stays a string.
    """
    text = raw.strip()
    try:
        value = ast.literal_eval(text)
        return list(value) if isinstance(value, tuple) else value
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    if text[:1] in ("[", "{"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return raw
    return raw


def parse_datasets(raw: Any) -> List[str]:
    """``"a,b"`` / ``"[a, b]"`` / ``["a", "b"]`` -> ``["a", "b"]`` (empty entries dropped)."""
    value = parse_value(raw) if isinstance(raw, str) else raw
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"datasets must be a name or a comma-separated list of names (e.g. datasets=vqa2,vg), "
            f"got {raw!r}."
        )
    return [v.strip() for v in value if v.strip()]
