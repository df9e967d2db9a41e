"""Every task is one package under villa_plugin/tasks/, found by the package walk and the registry."""
import importlib
import inspect
import os

import pytest
from omegaconf import OmegaConf

import villa_plugin.tasks
from villa_plugin.adversarial.losses import KL_REDUCTIONS
from villa_plugin.datasets.task_builder import TaskBuilder
from villa_plugin.datasets.task_common import IMG_DB_KEYS
from villa_plugin.models.heads import TaskHead
from villa_plugin.registry import registry

TASKS_DIR = os.path.dirname(villa_plugin.tasks.__file__)
BUILDERS = [n for n in registry.names("builder") if issubclass(registry.get_builder_class(n), TaskBuilder)]
HEADS = registry.names("head")


def _package_of(obj) -> str:
    module = obj.__module__
    assert module.startswith("villa_plugin.tasks."), f"{obj} is registered from {module}, outside villa_plugin/tasks"
    return module.split(".")[2]


def test_the_package_walk_finds_every_task_package():
    on_disk = sorted(d for d in os.listdir(TASKS_DIR) if os.path.isfile(os.path.join(TASKS_DIR, d, "__init__.py")))
    assert villa_plugin.tasks.task_packages() == on_disk
    assert {"vqa", "nlvr2", "visual_entailment", "vcr", "retrieval", "refcoco"} <= set(on_disk)
    registered = [registry.get_component(kind, n) for kind in ("builder", "head") for n in registry.names(kind)]
    registering = {obj.__module__.split(".")[2] for obj in registered if obj.__module__.startswith("villa_plugin.tasks.")}
    assert {"vqa", "nlvr2", "visual_entailment", "vcr", "retrieval", "refcoco"} <= registering <= set(on_disk)


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_defaults_live_in_its_package_and_declare_the_shared_keys(name):
    cls = registry.get_builder_class(name)
    package_dir = os.path.join(TASKS_DIR, _package_of(cls))
    assert cls.config_path() == os.path.join(package_dir, "defaults.yaml")
    keys = OmegaConf.load(cls.config_path())["dataset_config"][name]
    missing = [k for k in ("source", "max_txt_len", "missing_images", "demo", "demo_dir", *IMG_DB_KEYS) if k not in keys]
    assert missing == []
    assert keys.missing_images == "error" and keys.source in cls.SOURCES
    for source in cls.SOURCES:  # one reader per source, all with the one signature
        reader = getattr(cls, f"read_{source}")
        assert list(inspect.signature(reader).parameters) == ["self", "ctx"]
    assert cls.DEMO is not None and callable(cls.DEMO.materialise_demo)


@pytest.mark.parametrize("name", HEADS)
def test_heads_are_task_heads_declaring_what_the_model_needs(name):
    cls = registry.get_head_class(name)
    if not cls.__module__.startswith("villa_plugin.backbones."):  # a backbone's own heads (LXMERT's logit_fc)
        _package_of(cls)
    assert issubclass(cls, TaskHead) and cls.module_name and cls.kl_reduction in KL_REDUCTIONS
    assert list(inspect.signature(cls.forward).parameters) == ["self", "trunk", "batch"]


def test_task_modules_import_no_other_task_except_the_vqa_head_family():
    """Tasks share plumbing through villa_plugin.datasets / models, not through each other (SNLI-VE's
    head and dataset are VQA's with 3 labels, VCR's classifier is VQA's MLP, GQA's builder, dataset,
    metric and demo scenes are VQA's with LXMERT's JSON records, the pre-training demo uses the VQA
    demo's vocabulary so that its checkpoint fine-tunes on it: those imports are the only ones allowed)."""
    allowed = {("visual_entailment", "vqa"), ("vcr", "vqa"), ("gqa", "vqa"), ("pretrain", "vqa")}
    for package in villa_plugin.tasks.task_packages():
        for file in sorted(os.listdir(os.path.join(TASKS_DIR, package))):
            if not file.endswith(".py"):
                continue
            source = open(os.path.join(TASKS_DIR, package, file), encoding="utf-8").read()
            for other in villa_plugin.tasks.task_packages():
                if other != package and f"villa_plugin.tasks.{other}" in source:
                    assert (package, other) in allowed, f"tasks/{package}/{file} imports tasks.{other}"
    importlib.import_module("villa_plugin.components")
