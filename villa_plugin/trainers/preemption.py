"""Preemption-safe training: SIGTERM, SIGINT and SIGUSR1 end training with a checkpoint.

While the training loop runs, these signals only set a flag (:class:`StopSignals`). After the
update in progress has finished (callbacks included), the loop checks the flag; under
``torchrun`` every rank all-reduces it first, so a signal that reaches one rank stops them all at
the same update. Then :func:`stop_for_signal` writes ``current.ckpt`` and
``models/model_<update>.ckpt`` atomically (unless this update was just saved), logs where they are
and raises :class:`Preempted`; ``mmf_run`` prints the exact resume command and exits with
:data:`EXIT_PREEMPTED`. ``checkpoint.resume=True`` then continues as if nothing had happened.

A second SIGINT (Ctrl-C twice) stops at once, without a checkpoint (``KeyboardInterrupt``).
Outside the training loop (set-up, final evaluation) the signals keep their usual behaviour.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Dict, Optional

import torch

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry"
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class Preempted(Exception):
    """Training stopped for a signal after writing a checkpoint (``mmf_run`` exits with
    :data:`EXIT_PREEMPTED`)."""

    def __init__(self, signal_name: str, num_updates: int, checkpoint: str):
        super().__init__(f"stopped by {signal_name} after update {num_updates}; checkpoint saved to {checkpoint}")
        self.signal_name = signal_name
        self.num_updates = num_updates
        self.checkpoint = checkpoint


class StopSignals:
    """Context manager: while active, :data:`STOP_SIGNALS` set :attr:`received` instead of ending
    the process. Only the main thread of the process that entered it reacts (forked DataLoader
    workers inherit the handler and ignore the signal: their parent shuts them down)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if self.received is None:
            self.received = signum
            logger.warning(
                "received %s: finishing the current update, then saving a checkpoint and stopping "
                "(Ctrl-C again stops at once without saving)", signal.Signals(signum).name,
            )

    def agreed(self, strategy, device: torch.device) -> Optional[str]:
        """The name of the signal that stops training, or None to go on. With several ranks the flag
        is all-reduced, so every rank gets the same answer at the same update."""
        if strategy.world_size > 1:
            flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
            if strategy.all_reduce_sum(flag).item() == 0:
                return None
        elif self.received is None:
            return None
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"


def stop_for_signal(trainer, signal_name: str) -> None:
    """Write the checkpoint of the update just finished (on every rank's call; rank 0 writes),
    log where it is and raise :class:`Preempted`."""
    from villa_plugin.trainers.callbacks import CheckpointCallback

    saver = trainer.callbacks.find(CheckpointCallback)
    n = trainer.num_updates
    saved_periodic = (
        saver is not None and getattr(saver, "last_saved", None) == n and saver.interval > 0 and n % saver.interval == 0
    )
    if not saved_periodic:  # the same decision on every rank: saving is collective
        trainer.save_checkpoint(keep=True)
    path = trainer.checkpoint_files.current
    trainer.log.warning(
        f"{signal_name}: training stopped after update {trainer.num_updates} of {trainer.max_updates}; "
        f"checkpoint saved to {path} (and {trainer.checkpoint_files.model_file(trainer.num_updates)}). "
        f"Resume with checkpoint.resume=True."
    )
    raise Preempted(signal_name, trainer.num_updates, path)
