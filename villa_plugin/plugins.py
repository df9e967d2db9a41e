"""Plugin discovery: MMF's ``env.user_dir`` / ``MMF_USER_DIR`` and installed entry points.

A plugin is a Python package or module whose import registers components
(``@registry.register_model(...)`` etc.). Two ways to bring one in:

* ``env.user_dir=/path/to/my_pkg`` (or the ``MMF_USER_DIR`` environment variable): a directory
  holding a package (its parent goes on ``sys.path`` and it is imported by name), a ``.py`` file,
  or the name of an importable module.
* an installed distribution declaring an entry point in the ``villa_plugin.plugins`` group,
  e.g. in setup.py ``entry_points={"villa_plugin.plugins": ["myteam = myteam_plugin"]}``.

Each is imported once per process, before the config is composed, so that the plugin's models and
builders (and their ``config_path()`` YAML) take part in composition.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence, Set, Tuple

from villa_plugin.common.errors import UserError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "villa_plugin.plugins"
USER_DIR_ENV = "MMF_USER_DIR"

_user_dirs: Dict[str, ModuleType] = {}
_entry_points: Set[Tuple[str, str]] = set()


def load_plugins(user_dir: Optional[str] = None, base_dirs: Sequence[os.PathLike] = ()) -> None:
    """Import the entry-point plugins, then ``user_dir`` (``MMF_USER_DIR`` when None; "" = none)."""
    load_entry_point_plugins()
    if user_dir is None:
        user_dir = os.environ.get(USER_DIR_ENV, "")
    if user_dir:
        import_user_dir(user_dir, base_dirs)


def import_user_dir(path_or_module: str, base_dirs: Sequence[os.PathLike] = ()) -> ModuleType:
    """Import a user plugin once per process and return its module.

    ``path_or_module`` is a package directory, a ``.py`` file, or an importable module name.
    Relative paths are tried against the current directory, then each of ``base_dirs`` (e.g. the
    directory of the config file that named it). Raises :class:`UserError` when it cannot be found
    or its import fails.
    """
    spec = os.path.expanduser(str(path_or_module).strip())
    if not spec:
        raise UserError("env.user_dir is empty: give a plugin directory or an importable module name.")
    if spec in _user_dirs:
        return _user_dirs[spec]
    location = _find_location(spec, base_dirs)
    if location is None:
        if _looks_like_path(spec):
            looked = ", ".join(str(p) for p in _candidates(spec, base_dirs))
            raise UserError(
                f'Plugin directory env.user_dir="{spec}" does not exist (looked at: {looked}). '
                f"Point env.user_dir (or {USER_DIR_ENV}) at a directory holding your package."
            )
        module = _import(spec, label=spec)
        _user_dirs[spec] = module
        return module
    key = str(location)
    if key not in _user_dirs:
        name = location.stem if location.is_file() else location.name
        if not name.isidentifier():
            raise UserError(
                f'Plugin "{location}": "{name}" is not a valid Python module name; rename it '
                f"(letters, digits and underscores, not starting with a digit)."
            )
        _check_no_clash(name, location)
        parent = str(location.parent)
        if parent not in sys.path:
            sys.path.insert(0, parent)
        _user_dirs[key] = _import(name, label=str(location))
        logger.info("Imported user plugin %s from %s", name, location)
    _user_dirs[spec] = _user_dirs[key]
    return _user_dirs[key]


def load_entry_point_plugins(group: str = ENTRY_POINT_GROUP) -> List[str]:
    """Import every installed entry point of ``group`` not imported yet; returns their names."""
    loaded = []
    for entry_point in importlib.metadata.entry_points(group=group):
        key = (entry_point.name, entry_point.value)
        if key in _entry_points:
            continue
        dist = getattr(getattr(entry_point, "dist", None), "name", None) or "an installed package"
        label = f'"{entry_point.name}" ({entry_point.value}, from {dist})'
        try:
            entry_point.load()
        except Exception as err:
            raise UserError(f"Cannot load plugin {label}: {_describe_error(err)}") from err
        _entry_points.add(key)
        loaded.append(entry_point.name)
        logger.info("Loaded plugin %s", label)
    return loaded


def _import(name: str, label: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            raise UserError(
                f'Plugin env.user_dir="{label}" is neither an existing directory nor an importable '
                f"module. Give the path of your plugin package (or set {USER_DIR_ENV})."
            ) from err
        raise UserError(f'Cannot import plugin "{label}": {_describe_error(err)}') from err
    except Exception as err:
        raise UserError(f'Cannot import plugin "{label}": {_describe_error(err)}') from err


def _describe_error(err: BaseException) -> str:
    """``Type: message (at file:line)`` of the innermost frame, so the user can find the bug."""
    text = f"{type(err).__name__}: {err}"
    frames = traceback.extract_tb(err.__traceback__)
    if frames and not isinstance(err, SyntaxError):  # a SyntaxError names its own file and line
        text += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return text


def _candidates(spec: str, base_dirs: Sequence[os.PathLike]) -> List[Path]:
    if os.path.isabs(spec):
        return [Path(spec)]
    return [Path.cwd() / spec] + [Path(base) / spec for base in base_dirs]


def _find_location(spec: str, base_dirs: Sequence[os.PathLike]) -> Optional[Path]:
    for candidate in _candidates(spec, base_dirs):
        if candidate.is_dir() or (candidate.is_file() and candidate.suffix == ".py"):
            return candidate.resolve()
    return None


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith(".") or spec.endswith(".py")


def _check_no_clash(name: str, location: Path) -> None:
    """Refuse a plugin whose name is already imported from elsewhere (it would be silently skipped)."""
    module = sys.modules.get(name)
    if module is None:
        return
    origins = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", []) or [])
    for origin in filter(None, origins):
        origin = Path(origin).resolve()
        if origin == location or location in origin.parents:
            return
    where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
    raise UserError(
        f'Plugin "{location}": a different module named "{name}" is already imported (from {where}). '
        f"Rename your plugin package."
    )
