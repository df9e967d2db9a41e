"""Strict checks of experiment YAML and command-line values against the declared defaults.

Every key an experiment file or the command line sets must already exist in the composed defaults
(``configs/defaults.yaml`` + the selected model's and datasets' YAML), and its value must have the
default's type: bool, int, float (int accepted), str, list or dict. A ``null`` default, an empty
mapping default (a free-form table such as ``optimizer.lr_multipliers``) and ``${...}``
interpolations accept anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

from omegaconf import OmegaConf

from villa_plugin.common.errors import ConfigError
from villa_plugin.config.overrides import Override, PathSegment, parse_datasets
from villa_plugin.registry import suggest

_SELECTION_SECTIONS = {"model_config": "model", "dataset_config": "dataset"}
_SCALARS = (bool, int, float, str, type(None))


def dotted(path: Sequence[PathSegment]) -> str:
    """``("a", "b", 2, "c")`` -> ``"a.b[2].c"``."""
    text = ""
    for seg in path:
        text += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if text else str(seg))
    return text


def is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def all_keys(tree: Any, prefix: Sequence[PathSegment] = ()) -> List[str]:
    """Every dotted key (inner nodes included) of a nested dict."""
    keys: List[str] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            keys.append(dotted(tuple(prefix) + (key,)))
            keys.extend(all_keys(value, tuple(prefix) + (key,)))
    return keys


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )


@dataclass
class CheckResult:
    """The accepted value (unselected blocks dropped), the problems found and informational notes."""

    value: Any
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


class Checker:
    """Validates values against ``declared`` (a plain nested dict of the composed defaults).

    ``model`` / ``datasets`` are the selected names. A ``model_config.<x>`` / ``dataset_config.<x>``
    block for an unselected x is an error, except in a YAML file when x is a registered name: such
    blocks let one experiment file serve several models (``model=uniter`` on a VILLA experiment),
    so they are dropped with a note.
    """

    def __init__(
        self,
        declared: Dict[str, Any],
        model: Optional[str],
        datasets: Sequence[str],
        registered: Optional[Dict[str, Iterable[str]]] = None,
    ) -> None:
        self.declared = declared
        self.selected = {"model": [model] if model else [], "dataset": list(datasets)}
        self.registered = {kind: set(names) for kind, names in (registered or {}).items()}

    # -- entry points ----------------------------------------------------------------------
    def check_file(self, content: Dict[str, Any], source: str) -> CheckResult:
        """Check one experiment YAML layer (a plain dict, interpolations unresolved)."""
        result = CheckResult(value=None)
        result.value = self._check_mapping(content, self.declared, (), source, result, from_file=True)
        return result

    def check_override(self, override: Override, current: Any = None) -> CheckResult:
        """Check one command-line override; ``value`` may be coerced (e.g. ``7`` -> ``"7"`` for a str key).

        ``current`` (the config composed so far) bounds list indices: an experiment file may
        have replaced a declared list with a longer one.
        """
        if OmegaConf.is_config(current):
            current = OmegaConf.to_container(current, resolve=False)
        result = CheckResult(value=override.value)
        default = self._default_at(override.path, override.source, result, current)
        if result.errors:
            return result
        if default is _FREE:
            default = None  # inside a free-form table: any supported value
        value = override.value
        if isinstance(default, str) and not isinstance(value, str) and not isinstance(value, (list, dict)):
            value = override.raw_value  # a str key given "7" or "true" keeps the text as typed
        result.value = self._check_value(value, default, override.path, override.source, result, False)
        return result

    # -- tree walking ----------------------------------------------------------------------
    def _default_at(self, path, source: str, result: CheckResult, current: Any = None) -> Any:
        """Declared default at ``path`` (``_FREE`` inside free-form tables); records errors."""
        node: Any = self.declared
        for depth, seg in enumerate(path):
            here = path[: depth + 1]
            actual, current = current, _child(current, seg)
            if isinstance(node, dict):
                if isinstance(seg, int):
                    result.errors.append(
                        f'"{dotted(path)}" {source}: {dotted(path[:depth])} is a mapping, not a list.'
                    )
                    return None
                if not self._selected_ok(here, source, result, from_file=False):
                    return None
                if not node:
                    return _FREE
                if seg not in node:
                    result.errors.append(self._unknown_key(here, node, source))
                    return None
                node = node[seg]
            elif isinstance(node, list):
                if not isinstance(seg, int):
                    result.errors.append(
                        f'"{dotted(path)}" {source}: {dotted(path[:depth])} is a list; address items as [N].'
                    )
                    return None
                items = actual if isinstance(actual, list) else node
                if not 0 <= seg < len(items):
                    result.errors.append(
                        f'"{dotted(path)}" {source}: index {seg} is out of range, '
                        f"{dotted(path[:depth])} has {len(items)} item(s)."
                    )
                    return None
                node = node[seg] if seg < len(node) else None  # items of a replaced list: any type
            elif node is None or is_interpolation(node):
                return _FREE
            else:
                result.errors.append(
                    f'"{dotted(path)}" {source}: {dotted(path[:depth])} is {_a(_type_name(node))} value, '
                    f"not a mapping, so it has no key {seg!r}."
                )
                return None
        return node

    def _check_mapping(self, value: Dict, default: Dict, path, source, result, from_file) -> Dict:
        accepted = {}
        for key, item in value.items():
            here = tuple(path) + (key,)
            if not self._selected_ok(here, source, result, from_file):
                continue
            if not default:  # free-form table (e.g. optimizer.lr_multipliers): keys are the user's
                accepted[key] = item
                continue
            if key not in default:
                result.errors.append(self._unknown_key(here, default, source))
                continue
            if here == ("datasets",):
                try:
                    item = parse_datasets(item)
                except ConfigError as err:
                    result.errors.append(f"{str(err).rstrip('.')} ({source}).")
                    continue
            accepted[key] = self._check_value(item, default[key], here, source, result, from_file)
        return accepted

    def _check_value(self, value: Any, default: Any, path, source, result, from_file) -> Any:
        if not _is_supported(value):
            result.errors.append(
                f'"{dotted(path)}" {source}: unsupported value {value!r} of type {type(value).__name__}.'
            )
            return value
        if is_interpolation(value) or default is None or is_interpolation(default) or default == "???":
            return value
        expected = _expected_type(default)
        if isinstance(default, str) and isinstance(value, bool):
            # YAML reads unquoted true/false as bools; a str key (e.g. progress_bar: auto | true | false)
            # takes their text, as it does from the command line
            return "true" if value else "false"
        if not _matches(value, default):
            result.errors.append(
                f'"{dotted(path)}" {source} must be {expected}{_default_text(default)}, '
                f"got {_a(_type_name(value))} {_short(value)}."
            )
            return value
        if isinstance(default, dict):
            return self._check_mapping(value, default, path, source, result, from_file)
        return value

    # -- selection of model / dataset blocks -------------------------------------------------
    def _selected_ok(self, path, source: str, result: CheckResult, from_file: bool) -> bool:
        if len(path) != 2 or path[0] not in _SELECTION_SECTIONS:
            return True
        kind = _SELECTION_SECTIONS[path[0]]
        name = path[1]
        selected = self.selected[kind]
        if name in selected:
            return True
        if from_file and name in self.registered.get(kind, ()):
            result.notes.append(
                f"Ignoring {dotted(path)} {source}: {name} is not the selected {kind} "
                f"({_selection_text(kind, selected)})."
            )
            return False
        what = "the selected model" if kind == "model" else "a selected dataset"
        fix = f"select it with {'model' if kind == 'model' else 'datasets'}={name}"
        result.errors.append(
            f"{dotted(path)} is not {what} ({_selection_text(kind, selected)}) {source}: "
            f"{fix}, or remove the block.{suggest(name, selected)}"
        )
        return False

    def _unknown_key(self, path, siblings: Dict, source: str) -> str:
        key = dotted(path)
        parent = tuple(path[:-1])
        hint = (
            _same_name_elsewhere(path[-1], all_keys(self.declared))
            or suggest(key, [dotted(parent + (s,)) for s in siblings])
            or suggest(key, all_keys(self.declared))
        )
        return (
            f'Unknown config key "{key}" {source}.{hint} Keys must be declared in '
            f"configs/defaults.yaml or in the selected model's / datasets' defaults YAML."
        )


_FREE = object()


def _child(tree: Any, seg: PathSegment) -> Any:
    if isinstance(tree, dict):
        return tree.get(seg)
    if isinstance(tree, list) and isinstance(seg, int) and 0 <= seg < len(tree):
        return tree[seg]
    return None


def _same_name_elsewhere(name: PathSegment, keys: List[str]) -> str:
    """' Did you mean "training.seed"?' for a key whose last part is declared elsewhere (``seed=3``)."""
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == str(name)][:3]
    return f" Did you mean {' or '.join(_quoted(m) for m in matches)}?" if matches else ""


def _quoted(text: str) -> str:
    return f'"{text}"'


def _selection_text(kind: str, selected: List[str]) -> str:
    if kind == "model":
        return f"model={selected[0]}" if selected else "no model is selected"
    return f"datasets={','.join(selected)}" if selected else "no dataset is selected"


def _expected_type(default: Any) -> str:
    return "a number (int or float)" if isinstance(default, float) else _a(_type_name(default))


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default_text(default: Any) -> str:
    return "" if isinstance(default, dict) else f" (default: {_short(default)})"


def _matches(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _is_supported(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, list):
        return all(_is_supported(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_supported(v) for k, v in value.items())
    return False
