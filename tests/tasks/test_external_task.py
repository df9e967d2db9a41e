"""Adding a task touches its own package and one project YAML, nothing else (docs/adding_a_task.md):
a toy task package outside the repository, loaded through env.user_dir, trains with villa_free_at."""
import json
import sys
import textwrap
from pathlib import Path

import pytest

from villa_plugin import plugins
from villa_plugin.cli import run
from villa_plugin.registry import registry

FILES = {
    "__init__.py": """
        from toy_task import builder, head  # noqa: F401  (register)
    """,
    "demo.py": """
        import os

        import numpy as np

        from villa_plugin.datasets.features import write_img_db
        from villa_plugin.datasets.materialise import materialise
        from villa_plugin.datasets.synthetic import DEMO_FEATURES, dump_jsonl, region_record, vocab_tokens, write_vocab
        from villa_plugin.datasets.task_common import img_db_settings


        def paths(root):
            root = os.path.abspath(root)
            splits = {s: {"annotations": os.path.join(root, f"{s}.jsonl"), "img_db": os.path.join(root, "img_db", s),
                          "txt_db": ""} for s in ("train", "val")}
            return {"root": root, "vocab": os.path.join(root, "vocab.txt"), "lowercase": True, "splits": splits,
                    "img_key_format": "toy_{image}.npz", **DEMO_FEATURES}


        def _write(root):
            p = paths(root)
            write_vocab(p["vocab"], vocab_tokens(["is", "there", "a", "star", "circle"]))
            rng = np.random.default_rng(0)
            for split, split_paths in p["splits"].items():
                records, lines = [], []
                for i in range(16):
                    shape = ("star", "circle")[i % 2]
                    records.append((f"toy_{split}{i}.npz", region_record(rng, [(shape, "red")], n_background=3)))
                    lines.append({"image": f"{split}{i}", "text": "is there a star", "label": int(shape == "star")})
                write_img_db(split_paths["img_db"], records, **img_db_settings(DEMO_FEATURES))
                dump_jsonl(split_paths["annotations"], lines)


        def materialise_demo(root):
            materialise(root, {"name": "toy", "version": 1}, _write)
            return paths(root)
    """,
    "builder.py": """
        import torch

        from toy_task import demo
        from villa_plugin.common.sample_list import SampleList
        from villa_plugin.datasets.base import BaseDataset
        from villa_plugin.datasets.collate import collate_rows
        from villa_plugin.datasets.task_builder import ExampleRecords, TaskBuilder
        from villa_plugin.datasets.task_common import make_row
        from villa_plugin.registry import registry


        class ToyDataset(BaseDataset):
            def __init__(self, name, split, cfg, records, img_dbs):
                super().__init__(name, split, cfg)
                self.records, self.img_dbs = records, img_dbs

            def __len__(self):
                return len(self.records)

            def lengths(self):
                return [t + 2 + self.img_dbs[0].nbb(k) for t, k in zip(self.records.txt_lens, self.records.img_keys)]

            def __getitem__(self, i):
                r = self.records
                feat, pos = self.img_dbs[r.img_db_index[i]][r.img_keys[i]]
                return dict(make_row(r.cls_id, r.sep_id, [r.input_ids[i]], feat, pos), target=r.targets[i])

            def collate(self, examples):
                batch = collate_rows(examples)
                batch["targets"] = torch.as_tensor([e["target"] for e in examples])
                return SampleList(batch, dataset_name=self.dataset_name, dataset_type=self.dataset_type)


        @registry.register_builder("toy")
        class ToyBuilder(TaskBuilder):
            NAME = "toy"
            DEMO = demo
            SOURCES = ("annotations",)
            DEMO_PER_SPLIT = ("annotations", "img_db")

            def read_annotations(self, ctx):
                tok = ctx.tokenizer()
                records = ExampleRecords.in_memory(tok)
                for path, number, ann, ids in self.annotation_lines(ctx, tok, ("image", "text", "label"), "text", ""):
                    key = ctx.cfg["img_key_format"].format(image=ann["image"])
                    located = ctx.locate([key], f"{path}, line {number}")
                    if located is not None and not ctx.filt.over_limit(len(ids)):
                        records.add(ann["image"], len(ids), key, located[0], input_ids=ids, target=ann["label"])
                return records

            def make_dataset(self, ctx, records):
                return ToyDataset(self.dataset_name, ctx.split, ctx.cfg, records, ctx.img_dbs)
    """,
    "head.py": """
        from torch import nn

        from villa_plugin.models.heads import TaskHead
        from villa_plugin.registry import registry

        CALLS = []


        @registry.register_head("toy_head")
        class ToyHead(TaskHead):
            module_name = "toy_output"
            kl_reduction = "sum_classes_mean"

            def __init__(self, dims, num_labels, head_config):
                super().__init__(dims, num_labels, head_config)
                self.toy_output = nn.Linear(dims.hidden_size, num_labels)

            def forward(self, trunk, batch):
                CALLS.append(tuple(trunk.sequence.shape))
                return self.toy_output(trunk.pooled)
    """,
    "defaults.yaml": """
        dataset_config:
          toy:
            data_dir: ""
            source: annotations
            annotations: {}
            img_db: {}
            vocab: ""
            lowercase: true
            img_key_format: "toy_{image}.npz"
            max_txt_len: 60
            missing_images: error
            conf_th: 0.2
            max_bb: 100
            min_bb: 4
            num_bb: 36
            compressed: true
            demo: false
            demo_dir: ${env.cache_dir}/demo/toy_v1
    """,
}

PROJECT = """
    env:
      user_dir: {package}
    model: villa
    datasets: [toy]
    run_type: train_val
    training:
      trainer: villa_free_at
      seed: 1
      max_updates: 3
      batching: fixed
      batch_size: 8
      log_interval: 1
      evaluation_interval: 3
      checkpoint_interval: 3
      tensorboard: false
    evaluation:
      metrics: [accuracy]
      batch_size: 8
    model_config:
      villa:
        architecture: {{vocab_size: 64, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}
        head: toy_head
        num_labels: 2
        losses: [cross_entropy]
        adversarial: {{adv_modality: [text], adv_steps: 2}}
    dataset_config:
      toy:
        demo: true
"""


@pytest.fixture
def restore_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_user_dirs", {})
    monkeypatch.setattr(sys, "path", list(sys.path))
    registry.names("model")
    tables = {kind: dict(table) for kind, table in registry._tables.items()}
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    registry._tables.clear()
    registry._tables.update(tables)


def test_a_task_package_and_one_project_yaml_train_with_villa(tmp_path, capsys, restore_registry):
    package = tmp_path / "toy_task"
    for name, text in FILES.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    project = tmp_path / "toy.yaml"
    project.write_text(textwrap.dedent(PROJECT.format(package=package)).lstrip("\n"), encoding="utf-8")
    code = run([f"config={project}", f"env.cache_dir={tmp_path}/cache", f"env.save_dir={tmp_path}/save",
                "training.device=cpu", "training.log_format=json"])
    out = capsys.readouterr().out
    assert code == 0, out
    records = [json.loads(line[line.index('{"update"'):]) for line in out.splitlines() if '{"update"' in line]
    assert any("val/toy/accuracy" in r for r in records)
    assert registry.get_builder_class("toy").config_path() == str(package / "defaults.yaml")
    calls = sys.modules["toy_task.head"].CALLS
    assert len(calls) >= 3 * 3 and all(len(shape) == 3 and shape[2] == 16 for shape in calls)  # clean + 2 ascent steps
    assert Path(tmp_path / "save").is_dir()
