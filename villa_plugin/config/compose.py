"""``build_config(argv)``: compose and validate a run's config the way ``mmf_run`` reads it.

Merge order (later wins; dicts merge, lists are replaced):

1. ``configs/defaults.yaml`` (bundled);
2. the selected model's ``config_path()`` YAML (``model_config: {<model>: ...}``);
3. each selected dataset builder's ``config_path()`` YAML (``dataset_config: {<name>: ...}``);
4. the experiment YAML (``config=``) after its ``includes:``;
5. command-line overrides, in order.

The model and datasets come from the command line, else from the experiment YAML. Layers 1-3
declare the keys; every key set by layers 4-5 must be declared there and have the declared type.
Plugins (``env.user_dir`` from the command line or the experiment YAML, ``MMF_USER_DIR``, entry
points) are imported before composing, so their components' YAML take part.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from villa_plugin import plugins
from villa_plugin.common.errors import ConfigError
from villa_plugin.config import paths
from villa_plugin.config.loader import (
    Layer,
    find_config_file,
    find_experiment_file,
    load_with_includes,
    merge_layers,
)
from villa_plugin.config.overrides import Override, ParsedArgs, parse_argv, parse_datasets
from villa_plugin.config.run_type import parse_run_type
from villa_plugin.config.validate import Checker, CheckResult
from villa_plugin.registry import registry

logger = logging.getLogger(__name__)

DEFAULTS_YAML = "configs/defaults.yaml"
SAVED_CONFIG_NAME = "config.yaml"


def build_config(argv: Optional[Sequence[str]] = None, load_plugins: bool = True) -> DictConfig:
    """Compose the config for ``mmf_run``'s arguments (e.g. ``["config=x.yaml", "model=villa"]``).

    Raises :class:`ConfigError` (one message listing every problem) for unknown keys, wrong types,
    unselected model/dataset blocks, a bad run_type or a missing file.
    """
    args = parse_argv(list(argv or []))
    layers = load_with_includes(find_experiment_file(args.config)) if args.config else []
    experiment = merge_layers(layers)
    if load_plugins:
        user_dir, base_dirs = select_user_dir(args, layers)
        plugins.load_plugins(user_dir, base_dirs)
    model = select_model(args, experiment)
    datasets = select_datasets(args, experiment)

    config = compose_defaults(model, datasets)
    checker = Checker(
        OmegaConf.to_container(config, resolve=False),
        model,
        datasets,
        registered={"model": registry.names("model"), "dataset": registry.names("builder")},
    )
    config, results = apply_experiment(config, layers, checker)
    config, override_results = apply_overrides(config, args.overrides, checker)
    _report(results + override_results)
    finalize(config, model, datasets)
    return config


# -- selection ---------------------------------------------------------------------------------
def select_model(args: ParsedArgs, experiment: DictConfig) -> Optional[str]:
    """``model=`` from the command line, else ``model:`` from the experiment YAML (or None)."""
    model = args.value_of("model") if args.has("model") else experiment.get("model", None)
    if model is not None and not (isinstance(model, str) and model):
        raise ConfigError(f"model must be the name of a registered model (e.g. model=villa), got {model!r}.")
    return model


def select_datasets(args: ParsedArgs, experiment: DictConfig) -> List[str]:
    """``datasets=`` / ``dataset=`` from the command line, else ``datasets:`` from the YAML."""
    if args.has("datasets"):
        return list(args.value_of("datasets"))
    raw = experiment.get("datasets", None)
    return parse_datasets(OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw)


def select_user_dir(args: ParsedArgs, layers: Sequence[Layer]) -> Tuple[Optional[str], List[Path]]:
    """``env.user_dir`` from the command line, else the experiment YAML (None: use MMF_USER_DIR).

    Also returns where a relative path may lie besides the current directory: the directory of
    the YAML file that named it.
    """
    for override in reversed(args.overrides):
        if override.path == ("env", "user_dir"):
            return str(override.raw_value if override.value is None else override.value), []
    for layer in reversed(layers):
        value = OmegaConf.select(
            layer.config, "env.user_dir", default=None, throw_on_resolution_failure=False
        )
        if value is not None:
            return str(value), [Path(layer.path).parent]
    return None, []


# -- composition of the declared defaults ------------------------------------------------------
def compose_defaults(model: Optional[str], datasets: Sequence[str]) -> DictConfig:
    """Layers 1-3: bundled defaults, then the model's YAML, then each dataset builder's YAML."""
    root = Path(paths.bundled_root())
    config = merge_layers(load_with_includes(root / DEFAULTS_YAML))
    if model:
        config = OmegaConf.merge(config, component_defaults("model", model))
    for name in datasets:
        config = OmegaConf.merge(config, component_defaults("dataset", name))
    return config


def component_defaults(kind: str, name: str) -> DictConfig:
    """The defaults YAML of a registered model (``kind="model"``) or dataset builder.

    It must hold ``model_config.<name>`` / ``dataset_config.<name>``; a component without a YAML
    gets an empty block.
    """
    cls = registry.get_model_class(name) if kind == "model" else registry.get_builder_class(name)
    section = f"{kind}_config"
    what = f'{kind} "{name}" ({cls.__module__}.{cls.__qualname__})'
    path = cls.config_path()
    if path is None:
        return OmegaConf.create({section: {name: {}}})
    path = find_config_file(
        str(path), [("bundled configs", _bundled_root_or_none())], f"Defaults YAML of {what}"
    )
    config = merge_layers(load_with_includes(path))
    if OmegaConf.select(config, f"{section}.{name}", default=None, throw_on_resolution_failure=False) is None:
        raise ConfigError(
            f"Defaults YAML {path} of {what} must hold its settings under {section}: {{{name}: ...}} "
            f"(found top-level keys: {', '.join(map(str, config.keys())) or 'none'})."
        )
    return config


def _bundled_root_or_none() -> Optional[Path]:
    try:
        return Path(paths.bundled_root())
    except ConfigError:
        return None


# -- layers 4 and 5 ------------------------------------------------------------------------------
def apply_experiment(config: DictConfig, layers: Sequence[Layer], checker: Checker):
    """Check each experiment YAML layer against the declared keys and merge what passes."""
    results: List[CheckResult] = []
    for layer in layers:
        result = checker.check_file(OmegaConf.to_container(layer.config, resolve=False), f"in {layer.path}")
        results.append(result)
        config = OmegaConf.merge(config, OmegaConf.create(result.value))
    return config, results


def apply_overrides(config: DictConfig, overrides: Sequence[Override], checker: Checker):
    """Check and apply command-line overrides in order (``a.b[2]=x`` sets one list item)."""
    results: List[CheckResult] = []
    for override in overrides:
        result = checker.check_override(override, current=config)
        results.append(result)
        if not result.errors:
            set_value(config, override.path, result.value)
    return config, results


def set_value(config: DictConfig, path: Sequence[Any], value: Any) -> None:
    """Set ``path`` to ``value``: a mapping value merges into an existing mapping, others replace."""
    node = config
    for seg in path[:-1]:
        if isinstance(seg, str) and (seg not in node or node[seg] is None):
            node[seg] = {}  # inside a free-form table or under a null default
        node = node[seg]
    last = path[-1]
    existing = node[last] if (isinstance(last, int) or last in node) else None
    if isinstance(value, dict) and isinstance(existing, DictConfig):
        node[last] = OmegaConf.merge(existing, value)
    else:
        node[last] = value


def _report(results: Sequence[CheckResult]) -> None:
    for result in results:
        for note in result.notes:
            logger.info(note)
    errors = [error for result in results for error in result.errors]
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems in the config:\n" + "\n".join(f"  - {e}" for e in errors))


def finalize(config: DictConfig, model: Optional[str], datasets: Sequence[str]) -> None:
    """Record the selection, check run_type and that every ``${...}`` resolves."""
    config.model = model
    config.datasets = list(datasets)
    parse_run_type(config.run_type)
    try:
        OmegaConf.to_container(config, resolve=True)
        _expand_env_dirs(config)
    except Exception as err:  # omegaconf's interpolation / resolver errors
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f'Config key "{key}" cannot be resolved: {getattr(err, "msg", err)}') from err


def _expand_env_dirs(config: DictConfig) -> None:
    """Expand ``~`` in the ``env`` directories once, so every ``${env.*}`` path built on them is usable."""
    for key in ("cache_dir", "data_dir", "save_dir"):
        value = config.env.get(key)
        if isinstance(value, str) and value.startswith("~"):
            config.env[key] = os.path.expanduser(value)


# -- saving ------------------------------------------------------------------------------------
def save_config(config: DictConfig, save_dir: os.PathLike) -> str:
    """Write the resolved config to ``<save_dir>/config.yaml`` (atomically); returns its path.

    ``mmf_run config=<save_dir>/config.yaml`` reruns the same configuration.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / SAVED_CONFIG_NAME
    text = OmegaConf.to_yaml(config, resolve=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=save_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)
