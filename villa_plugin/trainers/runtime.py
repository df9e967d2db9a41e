"""Small pieces the trainer needs: what a run_type asks for, autocast, config access."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from villa_plugin.common.errors import ConfigError
from villa_plugin.config.run_type import parse_run_type
from villa_plugin.common.config_access import config_value as cfg  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class RunPlan:
    """The passes of a run: ``test`` evaluates metrics on the test split, ``predict`` writes its
    predictions instead (run_type ``predict``, or ``evaluation.predict`` with a test run_type)."""

    train: bool
    val: bool
    test: bool
    predict: bool

    @classmethod
    def parse(cls, run_type: str, predict_flag: bool = False) -> "RunPlan":
        phases = parse_run_type(str(run_type))
        predict = phases.predict or (bool(predict_flag) and phases.test)
        return cls(train=phases.train, val=phases.val, test=phases.test and not predict, predict=predict)


_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> str:
    """``training.precision`` validated for ``device`` (fp16 needs CUDA for its GradScaler)."""
    if precision not in _DTYPES:
        raise ConfigError(f'training.precision must be one of fp32, bf16, fp16; got "{precision}"')
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("training.precision=fp16 needs a CUDA device (its GradScaler is CUDA-only); use bf16 or fp32")
    return precision


def autocast(precision: str, device: torch.device):
    """Autocast for bf16/fp16, nothing for fp32."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


