"""Every trainable parameter of every task model receives a gradient from one training batch.

DDP and ZeRO (find_unused_parameters: false, the default) hang or fail on a trainable parameter that
gets no gradient; parameters a head never uses (the pooler under the NLVR2 / RefCOCO heads, the
pretraining-only mask embedding) must therefore be frozen by the model.
"""
import glob
import os

import pytest
from omegaconf import OmegaConf

from models_testlib import model_and_batches
from villa_plugin.config.paths import bundled_path
from villa_plugin.datasets.task_builder import TaskBuilder
from villa_plugin.registry import registry


def demo_projects():
    """``{builder name: projects/villa/<demo>.yaml}`` for every registered task builder with a demo:
    the bundled project that trains it on its demo (``datasets: [name]``, ``demo: true``)."""
    projects = {}
    for path in sorted(glob.glob(bundled_path("projects/villa/*.yaml"))):
        conf = OmegaConf.load(path)
        datasets = list(conf.get("datasets") or [])
        if len(datasets) == 1 and (conf.get("dataset_config") or {}).get(datasets[0], {}).get("demo"):
            projects.setdefault(datasets[0], os.path.relpath(path, bundled_path(".")))
    return projects


DEMO_TASKS = [name for name in registry.names("builder")
              if issubclass(registry.get_builder_class(name), TaskBuilder) and registry.get_builder_class(name).DEMO]


def _demo_of(name):
    return registry.get_builder_class(name).DEMO


def test_every_task_with_a_demo_has_a_demo_project():
    # builders sharing one demo (the pre-training corpora) need one project between them
    assert len(DEMO_TASKS) >= 6
    assert {_demo_of(n) for n in demo_projects()} == {_demo_of(n) for n in DEMO_TASKS}
    assert len(demo_projects()) == len({_demo_of(n) for n in DEMO_TASKS})


@pytest.mark.parametrize("task", sorted(demo_projects()))
def test_every_trainable_parameter_gets_a_gradient(task, tmp_path_factory):
    """A task mixture (pre-training) trains one task per update: there, every parameter gets a
    gradient from one batch of each task together (its ddp configs set find_unused_parameters)."""
    cache = tmp_path_factory.mktemp("cache")
    project = demo_projects()[task]
    model, batches = model_and_batches([f"config={project}", f"env.cache_dir={cache}"])

    model.train()
    for batch in batches:
        output = model(batch)
        sum(output["losses"].values()).backward()

    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
