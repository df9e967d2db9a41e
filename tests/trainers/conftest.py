"""Trainer tests run their tiny models on one intra-op thread: with several threads on a busy
2-core machine, OpenMP synchronisation makes each small op ~50x slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
