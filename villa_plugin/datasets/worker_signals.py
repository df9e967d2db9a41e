"""Stop signals in DataLoader workers: SLURM (and Ctrl-C) signal every process of a task, but a
worker must not die of SIGTERM / SIGINT / SIGUSR1 while its main process finishes the update and
writes the preemption checkpoint (trainers/preemption.py): the main process shuts it down.

torch's own worker handler exits quietly on a SIGTERM from the parent (its shutdown) and dies on
any other. Here the worker blocks the three signals and a thread takes them with
``sigwaitinfo``: a SIGTERM from the parent still ends the worker at once, any other is ignored.
Where ``sigwaitinfo`` does not exist, SIGINT and SIGUSR1 are ignored and SIGTERM keeps torch's rule.
"""
from __future__ import annotations

import os
import signal
import threading

_STOP_SIGNALS = {getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)}


def shield_worker_from_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the training and evaluation DataLoaders (see the module docstring)."""
    if not hasattr(signal, "sigwaitinfo"):
        for signum in _STOP_SIGNALS - {signal.SIGTERM}:
            signal.signal(signum, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # threads started later inherit the mask

    def take_signals() -> None:
        while True:
            info = signal.sigwaitinfo(_STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)  # the main process is shutting this worker down

    threading.Thread(target=take_signals, name="stop-signals", daemon=True).start()
