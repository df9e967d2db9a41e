"""Every trainable parameter of every task model receives a gradient from one training batch.

DDP and ZeRO (find_unused_parameters: false, the default) hang or fail on a trainable parameter that
gets no gradient; parameters a head never uses (the pooler under the NLVR2 / RefCOCO heads, the
pretraining-only mask embedding) must therefore be frozen by the model.
"""
import pytest

from villa_plugin.config.compose import build_config
from villa_plugin.registry import registry

DEMOS = ["demo", "demo_nlvr2", "demo_snli_ve", "demo_vcr", "demo_retrieval", "demo_refcoco"]


@pytest.mark.parametrize("demo", DEMOS)
def test_every_trainable_parameter_gets_a_gradient(demo, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = build_config([f"config=projects/villa/{demo}.yaml", f"env.cache_dir={cache}"], load_plugins=False)
    model = registry.get_model_class(config.model)(config.model_config[config.model])
    model.build()
    model.init_losses()
    name = config.datasets[0]
    builder = registry.get_builder_class(name)(name, config.dataset_config[name])
    builder.prepare()
    dataset = builder.build_dataset("train")
    batch = dataset.collate([dataset[i] for i in range(4)])

    model.train()
    output = model(batch)
    sum(output["losses"].values()).backward()

    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
