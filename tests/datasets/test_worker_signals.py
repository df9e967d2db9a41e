"""DataLoader workers ignore stop signals from anyone but their parent (SLURM signals every
process; the main process must be able to finish its update and save first)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from villa_plugin.datasets.worker_signals import shield_worker_from_stop_signals


class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        time.sleep(0.01)
        return os.getpid()


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="needs sigwaitinfo")
def test_worker_survives_outside_stop_signals_and_still_shuts_down():
    loader = torch.utils.data.DataLoader(_Pids(), batch_size=4, num_workers=1,
                                         worker_init_fn=shield_worker_from_stop_signals)
    batches = iter(loader)
    worker = int(next(batches)[0])
    for name in ("TERM", "USR1", "INT"):  # sent by another process, as slurmstepd would
        subprocess.run(["kill", f"-{name}", str(worker)], check=True)
    time.sleep(0.2)
    assert sum(1 for _ in batches) == 15  # the worker delivered the rest of the epoch
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # an exhausted iterator shut the worker down (parent's SIGTERM or None)
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("worker still alive after shutdown")
