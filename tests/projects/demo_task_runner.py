"""Runs a bundled task demo through ``mmf_run`` (the real CLI, trainer and data) for the demo tests."""
from __future__ import annotations

import json
import time
from typing import Dict, List, Tuple

import pytest
import torch

from villa_plugin.cli import run


def mmf_run(capsys, config: str, tmp_path, *extra: str) -> Tuple[int, List[Dict], float]:
    """Exit code, the JSON log records and the wall time of one ``mmf_run`` in ``tmp_path``."""
    start = time.perf_counter()
    code = run([
        f"config={config}", f"env.cache_dir={tmp_path}/cache", f"env.save_dir={tmp_path}/save",
        "training.device=cpu", "training.tensorboard=false", "training.log_format=json", *extra,
    ])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out.splitlines()
    records = [json.loads(line[line.index('{"update"'):]) for line in out if '{"update"' in line]
    return code, records, seconds


def final_metrics(records: List[Dict], prefix: str) -> Dict[str, float]:
    """The last logged values of keys starting with ``prefix`` (the final evaluation)."""
    values: Dict[str, float] = {}
    for record in records:
        values.update({k: v for k, v in record.items() if k.startswith(prefix)})
    return values


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a busy 2-core machine: one intra-op thread is much faster than two (OpenMP
    synchronisation). Test modules import this fixture to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
