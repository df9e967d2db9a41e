"""Range checks of config values that have the right type but cannot work (``lr=-1``, one beta,
``num_workers=-1``, ``max_updates=0``), and of a run that would evaluate or predict with random
weights. ``mmf_run`` runs them right after composing, before any data is read."""
from __future__ import annotations

import math
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from villa_plugin.common.config_access import config_value
from villa_plugin.common.errors import ConfigError
from villa_plugin.config.run_type import parse_run_type

_MISSING = object()


def check_values(config: DictConfig) -> None:
    """Raise one ConfigError listing every out-of-range value (with the key and the fix)."""
    problems = _number_problems(config) + _betas_problems(config) + _weights_problems(config)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems))


def _get(config: DictConfig, key: str) -> Any:
    value = config_value(config, key, _MISSING)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# (key, test a number must pass, what the message says it must be)
_NUMBER_RULES = (
    ("training.max_updates", lambda v: v > 0,
     "a positive number of updates (or null with training.max_epochs set)"),
    ("training.max_epochs", lambda v: v > 0, "positive (or null)"),
    ("training.num_workers", lambda v: v >= 0,
     ">= 0 (0 loads data in the main process, N uses N worker processes)"),
    ("training.checkpoint_interval", lambda v: v >= 0, ">= 0 (0 turns it off)"),
    ("training.evaluation_interval", lambda v: v >= 0, ">= 0 (0 turns it off)"),
    ("training.log_interval", lambda v: v >= 1, ">= 1 (updates between log lines)"),
    ("optimizer.params.lr", lambda v: v >= 0 and math.isfinite(v),
     "a finite number >= 0, e.g. optimizer.params.lr=5e-5"),
    ("optimizer.params.eps", lambda v: v > 0, "> 0, e.g. 1e-6"),
    ("optimizer.params.weight_decay", lambda v: v >= 0, ">= 0"),
)


def _number_problems(config: DictConfig) -> List[str]:
    problems = []
    for key, ok, must in _NUMBER_RULES:
        value = _get(config, key)
        if _is_number(value) and not ok(value):
            problems.append(f"{key}={value} must be {must}.")
    return problems


def _betas_problems(config: DictConfig) -> List[str]:
    betas = _get(config, "optimizer.params.betas")
    if betas is _MISSING or betas is None:
        return []
    if isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas):
        return []
    return [f"optimizer.params.betas={betas} must be two numbers in [0, 1), e.g. optimizer.params.betas=[0.9,0.98]."]


def _weights_problems(config: DictConfig) -> List[str]:
    """A run that does not train needs weights: a checkpoint to resume or pretrained weights."""
    if parse_run_type(str(config.run_type)).train or _get(config, "checkpoint.allow_random_weights") is True:
        return []
    checkpoint = [
        _get(config, "checkpoint.resume_file"), _get(config, "checkpoint.resume"), _get(config, "checkpoint.resume_best")
    ]
    model = config_value(config, "model", None)
    pretrained = _get(config, f"model_config.{model}.pretrained_checkpoint") if model else _MISSING
    if any(v not in (_MISSING, None, "", False) for v in checkpoint + [pretrained]):
        return []
    return [
        f"run_type={config.run_type} does not train, and no weights are configured: it would evaluate / predict "
        f"with randomly initialised weights. Set checkpoint.resume_file=<save_dir>/best.ckpt (or "
        f"checkpoint.resume=True with the training run's env.save_dir), or model_config.{model}.pretrained_checkpoint; "
        f"to really use random weights set checkpoint.allow_random_weights=true."
    ]
