"""Which source (a dataset, a task, a (task, dataset) pair) the next update draws from.

:class:`SourceSampler` is seeded and resumable: draw ``n`` depends only on ``(seed, n)``, so its
whole state is the number of draws made. A resumed run continues the same sequence, and every
rank, built with the same seed, picks the same source for the same update (their logged keys and
collectives then line up). :func:`sampling_weights` turns a strategy name into weights.
"""
from __future__ import annotations

import bisect
import math
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from villa_plugin.common.errors import ConfigError

STRATEGIES = ("size_proportional", "equal", "ratios", "mix_ratio")


class SourceSampler:
    """Draws source names with probabilities proportional to ``weights`` (``{name: weight}``)."""

    def __init__(self, weights: Mapping[str, float], seed: int = 0):
        if not weights:
            raise ValueError("SourceSampler needs at least one source")
        bad = {name: w for name, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)}
        if bad:
            raise ValueError(f"source weights must be finite and > 0, got {bad}")
        self.names = list(weights)
        total = float(sum(weights.values()))
        self.probabilities = {name: float(weights[name]) / total for name in self.names}
        self._cumulative = list(np.cumsum([self.probabilities[n] for n in self.names]))
        self.seed = int(seed)
        self.draws = 0

    def next(self) -> str:
        """The source of the next draw."""
        index = 0
        if len(self.names) > 1:
            u = np.random.default_rng([self.seed, self.draws]).random()
            index = min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)
        self.draws += 1
        return self.names[index]

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.draws = int(state["seed"]), int(state["draws"])


def sampling_weights(strategy: str, sizes: Mapping[str, int], ratios: Mapping[str, float], key: str,
                     declared: Optional[Mapping[str, Optional[float]]] = None) -> Dict[str, float]:
    """Weights per source for ``strategy``: ``size_proportional`` (``sizes``), ``equal``, ``ratios``
    (``ratios``, one positive number for every source) or ``mix_ratio`` (``declared``: the weight each
    source's dataset declares, e.g. a pre-training dataset's per-task ``mix_ratio``; UNITER's
    MetaLoader pool). Declared weights under another strategy would be ignored: an error.
    ``key`` names the config block in error messages."""
    names: Sequence[str] = list(sizes)
    if strategy not in STRATEGIES:
        raise ConfigError(f'{key}.type must be one of {", ".join(STRATEGIES)}; got "{strategy}"')
    declared = {n: w for n, w in (declared or {}).items() if w is not None}
    if strategy == "mix_ratio":
        undeclared = [n for n in names if n not in declared]
        if undeclared:
            raise ConfigError(f"{key}.type=mix_ratio takes each train stream's weight from its dataset's mix_ratio, "
                              f"but {', '.join(undeclared)} declare(s) none; use another {key}.type")
        if ratios:
            raise ConfigError(f"{key}.sampling_ratios is set but {key}.type is mix_ratio, which ignores it: remove it")
        return {name: float(declared[name]) for name in names}
    if declared:
        raise ConfigError(
            f"the train streams {', '.join(declared)} come from datasets with a mix_ratio, which {key}.type={strategy} "
            f"would ignore: set {key}.type=mix_ratio (UNITER pre-training), or remove the datasets' mix_ratio"
        )
    if ratios and strategy != "ratios":
        raise ConfigError(
            f"{key}.sampling_ratios is set but {key}.type is {strategy}, which ignores it: set "
            f"{key}.type=ratios to use the ratios, or remove {key}.sampling_ratios"
        )
    if strategy == "equal":
        return {name: 1.0 for name in names}
    if strategy == "size_proportional":
        empty = [name for name in names if sizes[name] < 1]
        if empty:
            raise ConfigError(f"{key}.type=size_proportional: the train split of {', '.join(empty)} is empty")
        return {name: float(sizes[name]) for name in names}
    missing = [name for name in names if name not in ratios]
    unknown = [name for name in ratios if name not in sizes]
    if missing or unknown:
        raise ConfigError(
            f"{key}.sampling_ratios must give one weight per train dataset ({', '.join(names)}); "
            + (f"missing: {', '.join(missing)}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"not a train dataset: {', '.join(map(str, unknown))}" if unknown else "")
        )
    bad = {n: r for n, r in ratios.items() if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0}
    if bad:
        raise ConfigError(f"{key}.sampling_ratios must be positive numbers, got {bad}")
    return {name: float(ratios[name]) for name in names}
