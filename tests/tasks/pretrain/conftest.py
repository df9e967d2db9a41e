"""The pre-training demo materialised once per test session (a few seconds)."""
import pytest


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    from villa_plugin.tasks.pretrain.demo import materialise_demo

    cache = tmp_path_factory.mktemp("pretrain_cache")
    materialise_demo(str(cache / "demo" / "pretrain_v1"))
    return cache
