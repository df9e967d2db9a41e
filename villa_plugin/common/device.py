"""Device selection and seeding for a run (``training.device``, ``training.seed``)."""
from __future__ import annotations

import logging
import os
import random
import secrets
from typing import Optional

import numpy as np
import torch

from villa_plugin.common.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1  # numpy's limit


def local_rank() -> Optional[int]:
    """``LOCAL_RANK`` set by torchrun, or None outside a distributed launch."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def select_device(spec: str = "auto") -> torch.device:
    """Resolve ``training.device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.

    ``auto`` picks CUDA when available, else CPU. Under torchrun, ``auto`` and ``cuda`` mean
    ``cuda:$LOCAL_RANK`` (not cuda:0 for every rank). The chosen CUDA device is made current.
    """
    text = str(spec).strip().lower() if spec is not None else "auto"
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        return _cuda_device(text, spec)
    raise ConfigError(
        f'training.device="{spec}" is not a device: use auto (CUDA when available, else CPU), cpu, '
        f"cuda or cuda:N."
    )


def _cuda_device(text: str, spec: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError(
            f'training.device="{spec}" but CUDA is not available on this machine. '
            f"Use training.device=auto or training.device=cpu."
        )
    if text == "cuda":
        rank = local_rank()
        index = rank if rank is not None else torch.cuda.current_device()
    else:
        try:
            index = int(text.split(":", 1)[1])
        except ValueError:
            raise ConfigError(
                f'training.device="{spec}": the CUDA index must be an integer (cuda:0).'
            ) from None
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigError(
            f'training.device="{spec}" asks for CUDA device {index}, but this machine has {count} '
            f"(cuda:0 .. cuda:{count - 1})."
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def set_seed(seed: Optional[int]) -> int:
    """Seed python, numpy and torch (CPU and every CUDA device); returns the seed used.

    ``seed`` None or negative (MMF's -1) draws a random seed, which is returned so it can be logged
    and saved with the config.
    """
    if isinstance(seed, bool) or not (seed is None or isinstance(seed, int)):
        raise ConfigError(f"training.seed must be an integer (-1 for a random seed), got {seed!r}.")
    if seed is None or seed < 0:
        seed = secrets.randbelow(MAX_SEED + 1)
        logger.info("training.seed=-1: drew random seed %d", seed)
    elif seed > MAX_SEED:
        raise ConfigError(f"training.seed must be at most {MAX_SEED}, got {seed}.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    return seed
