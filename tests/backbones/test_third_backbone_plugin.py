"""A third backbone, written as a user plugin (``env.user_dir``), trains with ``villa_free_at``
through ``mmf_run`` by implementing only the Perturbable protocol; a model missing a member is a
clear error. The plugin package is written into tmp_path by the test."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from villa_plugin.cli import run

PACKAGE = "toy_mixer_backbone"
MODEL_YAML = """
    model_config:
      NAME:
        vocab_size: 30
        img_dim: 6
        hidden: 16
        num_labels: 2
        dropout: 0.1
        losses: [cross_entropy]
        adversarial:
          adv_training: true
          adv_modality: [image, text]
          adv_steps: 2
          adv_lr_txt: 0.1
          adv_lr_img: 0.1
          adv_init_mag: 0.05
          adv_kl_weight: 1.5
"""
PLUGIN_FILES = {
    "__init__.py": """
        from . import data, model  # noqa: F401  (imports register)
    """,
    "model.py": '''
        import os

        import torch
        from torch import nn

        from villa_plugin.models.base_model import BaseModel
        from villa_plugin.registry import registry


        @registry.register_model("toy_mixer_vl")
        class ToyMixerVL(BaseModel):
            """Not a transformer: embeddings, one shared LayerNorm, a token-wise MLP, masked mean-pool."""

            kl_reduction = "sum_classes_mean"

            @classmethod
            def config_path(cls):
                return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "model.yaml")

            def build(self):
                c = self.config
                self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden, padding_idx=0)
                self.img_linear = nn.Linear(c.img_dim, c.hidden)
                self.LayerNorm = nn.LayerNorm(c.hidden)
                self.mixer = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.GELU(), nn.Dropout(c.dropout))
                self.classifier = nn.Linear(c.hidden, c.num_labels)

            # -- the Perturbable protocol ---------------------------------------------------------
            def perturbation_shapes(self, batch):
                bsz, length = batch["input_ids"].shape
                return {"text": (bsz, length, self.config.hidden), "image": tuple(batch["img_feat"].shape)}

            def perturbation_masks(self, batch):
                return {"text": batch["input_ids"] != 0, "image": batch["img_mask"]}

            def forward(self, batch, perturbation=None):
                perturbation = perturbation or {}
                words = self.word_embeddings(batch["input_ids"]).float()
                if perturbation.get("text") is not None:
                    words = words + perturbation["text"].float()
                feats = batch["img_feat"].float()
                if perturbation.get("image") is not None:
                    feats = feats + perturbation["image"].float()
                tokens = torch.cat([self.LayerNorm(words), self.LayerNorm(self.img_linear(feats))], dim=1)
                real = torch.cat([batch["input_ids"] != 0, batch["img_mask"]], dim=1).unsqueeze(-1).float()
                pooled = (self.mixer(tokens) * real).sum(1) / real.sum(1)
                return {"scores": self.classifier(pooled)}


        @registry.register_model("toy_mixer_vl_no_masks")
        class ToyMixerVLNoMasks(ToyMixerVL):
            """The same model without ``perturbation_masks``."""

            perturbation_masks = None

            @classmethod
            def config_path(cls):
                return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "model_no_masks.yaml")
    ''',
    "data.py": '''
        import os

        import torch

        from villa_plugin.common.sample_list import SampleList
        from villa_plugin.datasets.base import BaseDataset, BaseDatasetBuilder
        from villa_plugin.registry import registry


        class PairsDataset(BaseDataset):
            """Token ids (0 = padding) and region features; the label depends on both."""

            def __init__(self, name, split, config):
                super().__init__(name, split, config)
                g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
                n, length, regions = config.num_examples, config.max_len, config.max_regions
                self.ids = torch.randint(1, config.vocab_size, (n, length), generator=g)
                self.txt_len = torch.randint(2, length + 1, (n,), generator=g)
                self.feat = torch.randn(n, regions, config.img_dim, generator=g)
                self.num_regions = torch.randint(1, regions + 1, (n,), generator=g)
                self.labels = ((self.ids[:, 0] % 2) ^ (self.feat[:, 0, 0] > 0).long()).long()

            def __len__(self):
                return len(self.labels)

            def __getitem__(self, i):
                ids = self.ids[i].clone()
                ids[int(self.txt_len[i]):] = 0
                mask = torch.arange(self.feat.size(1)) < self.num_regions[i]
                return {"input_ids": ids, "img_feat": self.feat[i] * mask[:, None], "img_mask": mask,
                        "targets": self.labels[i]}

            def lengths(self):
                return (self.txt_len + self.num_regions).tolist()

            def collate(self, examples):
                return SampleList(
                    **{key: torch.stack([e[key] for e in examples]) for key in examples[0]},
                    dataset_name=self.dataset_name,
                    dataset_type=self.dataset_type,
                )


        @registry.register_builder("toy_mixer_pairs")
        class PairsBuilder(BaseDatasetBuilder):
            @classmethod
            def config_path(cls):
                return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "data.yaml")

            def build_dataset(self, split):
                return PairsDataset(self.dataset_name, split, self.config)
    ''',
    "configs/model.yaml": MODEL_YAML.replace("NAME", "toy_mixer_vl"),
    "configs/model_no_masks.yaml": MODEL_YAML.replace("NAME", "toy_mixer_vl_no_masks"),
    "configs/data.yaml": """
        dataset_config:
          toy_mixer_pairs:
            num_examples: 32
            vocab_size: 30
            max_len: 5
            max_regions: 4
            img_dim: 6
    """,
}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugins") / PACKAGE
    for rel, text in PLUGIN_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


def mmf_run(plugin_dir: Path, save_dir: Path, model: str) -> int:
    return run([
        f"model={model}", "datasets=toy_mixer_pairs", f"env.user_dir={plugin_dir}", f"env.save_dir={save_dir}",
        "run_type=train", "training.trainer=villa_free_at", "training.max_updates=3", "training.batch_size=8",
        "training.device=cpu", "training.tensorboard=false", "training.log_format=json", "training.log_interval=1",
    ])  # fmt: skip


def test_a_plugin_backbone_trains_adversarially_through_mmf_run(plugin_dir, tmp_path, capsys):
    assert mmf_run(plugin_dir, tmp_path / "save", "toy_mixer_vl") == 0
    out = capsys.readouterr().out.splitlines()
    updates = [json.loads(line[line.index('{"update"'):]) for line in out if '{"update"' in line]
    train = [u for u in updates if "train/adv/kl" in u]
    assert [u["update"] for u in train] == [1, 2, 3]
    for logged in train:
        # both perturbations moved (random start + one ascent step) and changed the predictions
        assert logged["train/adv/delta_norm_text"] > 0 and logged["train/adv/delta_norm_image"] > 0
        assert logged["train/adv/kl"] > 0 and logged["train/adv/ascent_skips"] == 0


def test_a_plugin_backbone_missing_a_protocol_member_is_a_clear_error(plugin_dir, tmp_path, capsys):
    assert mmf_run(plugin_dir, tmp_path / "save", "toy_mixer_vl_no_masks") == 1
    err = capsys.readouterr().err
    assert 'Model "toy_mixer_vl_no_masks"' in err and "`perturbation_masks(batch)`" in err
    assert "docs/adding_a_backbone.md" in err
