"""The pre-training demo materialised once per test session (a few seconds), and one torch thread."""
import pytest
import torch


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    from villa_plugin.tasks.pretrain.demo import materialise_demo

    cache = tmp_path_factory.mktemp("pretrain_cache")
    materialise_demo(str(cache / "demo" / "pretrain_v1"))
    return cache


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
