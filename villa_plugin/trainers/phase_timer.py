"""Opt-in wall-clock split of each training update into phases (benchmarks only).

The trainer holds ``phase_timer = None`` by default and then adds nothing to an update: no clock
reads, no device synchronisation. A benchmark sets ``trainer.phase_timer = PhaseTimer(device)``;
each phase then ends with a device synchronisation (on CUDA), so that GPU work is charged to the
phase that queued it. That changes the overlap the normal loop has, which is the price of a split.

Phases of :meth:`MMFTrainer.run_update`: ``data`` (next micro-batches + copy to the device),
``forward_backward``, ``optimizer`` (zero_grad, unscale, clip, finite check, step, schedule) and
``logging`` (the update's callbacks).
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator, List, Optional

import torch

PHASES = ("data", "forward_backward", "optimizer", "logging")


class PhaseTimer:
    """Per-update seconds of every phase, plus the update's total wall time."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.updates: List[Dict[str, float]] = []
        self._current: Optional[Dict[str, float]] = None
        self._started = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin_update(self) -> None:
        self._sync()
        self._current = {name: 0.0 for name in PHASES}
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the enclosed time (synchronised at its end) to ``name``."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            if self._current is not None:
                self._current[name] += time.perf_counter() - start

    def end_update(self, recorded: bool = True, examples: int = 0) -> None:
        """Close the update (``examples`` it trained on); ``recorded=False`` drops it (no data,
        or a skipped non-finite update)."""
        if self._current is None:
            return
        self._current["total"] = time.perf_counter() - self._started
        self._current["examples"] = float(examples)
        if recorded:
            self.updates.append(self._current)
        self._current = None


def maybe_phase(timer: Optional[PhaseTimer], name: str):
    """``timer.phase(name)``, or a no-op context when timing is off."""
    return timer.phase(name) if timer is not None else contextlib.nullcontext()
