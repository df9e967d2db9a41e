"""Read YAML config files safely and expand their ``includes:`` into an ordered list of layers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from villa_plugin.common.errors import ConfigError
from villa_plugin.config import paths


@dataclass
class Layer:
    """One YAML file's content (``includes`` removed) and where it came from."""

    path: str
    config: DictConfig


def load_yaml(path: os.PathLike) -> DictConfig:
    """Load one YAML mapping (safe loader; ``1e-3`` is a float). Empty files give ``{}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"Cannot read config file {path}: {err.strerror or err}.") from err
    try:
        config = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except Exception as err:  # omegaconf wraps yaml errors in several types
        detail = str(err).replace('"<unicode string>"', str(path))
        raise ConfigError(f"Config file {path} is not valid YAML: {detail}") from err
    if not isinstance(config, DictConfig):
        raise ConfigError(
            f"Config file {path} must hold a mapping (key: value lines) at the top level, "
            f"found a {type(config).__name__}."
        )
    return config


def find_config_file(name: str, search_dirs: Sequence[Tuple[str, Optional[Path]]], what: str) -> Path:
    """First existing ``dir/name`` over ``search_dirs`` ((label, dir) pairs, dir None = skip).

    Absolute names are used as they are. Raises :class:`ConfigError` listing every place looked at.
    """
    name = os.path.expanduser(str(name))
    if os.path.isabs(name):
        candidates = [Path(name)]
    else:
        candidates = [Path(base) / name for _, base in search_dirs if base is not None]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    directories = [c for c in candidates if c.is_dir()]
    if directories:
        raise ConfigError(f'{what} "{name}" is a directory ({directories[0]}), not a YAML file: name a .yaml file in it.')
    looked = ", ".join(str(c) for c in candidates) or "(nowhere)"
    raise ConfigError(f'{what} "{name}" not found (looked at: {looked}).')


def _bundled_root_or_none() -> Optional[Path]:
    try:
        return Path(paths.bundled_root())
    except ConfigError:
        return None


def find_experiment_file(name: str) -> Path:
    """``config=<name>``: relative to the current directory first, then the bundled root."""
    return find_config_file(
        name,
        [("current directory", Path.cwd()), ("bundled configs", _bundled_root_or_none())],
        "Config file",
    )


def find_included_file(name: str, including_file: Path) -> Path:
    """An ``includes:`` entry: relative to the including file first, then the bundled root."""
    return find_config_file(
        name,
        [("including file", Path(including_file).parent), ("bundled configs", _bundled_root_or_none())],
        f"Included file (from {including_file})",
    )


def load_with_includes(path: os.PathLike, _chain: Tuple[Path, ...] = ()) -> List[Layer]:
    """Layers of ``path`` in merge order: its includes (recursively, depth first), then itself.

    An include cycle raises :class:`ConfigError` naming the chain of files.
    """
    path = Path(path).resolve()
    if path in _chain:
        chain = " -> ".join(str(p) for p in _chain + (path,))
        raise ConfigError(f"Config includes form a cycle: {chain}. Remove one of these includes.")
    config = load_yaml(path)
    layers: List[Layer] = []
    for name in _pop_includes(config, path):
        layers.extend(load_with_includes(find_included_file(name, path), _chain + (path,)))
    layers.append(Layer(str(path), config))
    return layers


def _pop_includes(config: DictConfig, path: Path) -> List[str]:
    includes = config.pop("includes", None) if "includes" in config else None
    if includes is None:
        return []
    includes = OmegaConf.to_container(includes) if OmegaConf.is_config(includes) else includes
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(
            f"includes in {path} must be a list of file paths (includes: [a.yaml, b.yaml]), got {includes!r}."
        )
    return includes


def merge_layers(layers: Sequence[Layer]) -> DictConfig:
    """Plain OmegaConf merge (dicts merge, lists are replaced) of the layers' configs."""
    return OmegaConf.merge(OmegaConf.create({}), *[layer.config for layer in layers])
