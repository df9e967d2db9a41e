"""Test-only components for the trainer tests: a tiny MLP model, a synthetic "numbers" dataset,
a callback that SIGKILLs its own process, and a config helper.

Also runnable as ``python trainer_toys.py <config.yaml>`` (what the kill-and-resume test launches):
seeds like ``mmf_run`` and runs the configured trainer.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import OmegaConf
from torch import nn

from villa_plugin.common.device import set_seed
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset, BaseDatasetBuilder
from villa_plugin.models.base_model import BaseModel
from villa_plugin.registry import registry
from villa_plugin.trainers.callbacks import Callback

ROOT = Path(__file__).resolve().parents[2]
MODEL = "test_toy_mlp"
DATASET = "test_numbers"
DATASET_B = "test_numbers_b"  # a second numbers dataset (own size and seed), for multi-dataset runs


@registry.register_model(MODEL, override=True)
class ToyMLP(BaseModel):
    """Linear -> LayerNorm -> ReLU -> Dropout -> Linear over ``batch.x``."""

    @classmethod
    def config_path(cls) -> str:
        return str(Path(__file__).resolve().parent / "trainer_toys_model.yaml")

    def build(self) -> None:
        c = self.config
        self.encoder = nn.Linear(c.in_dim, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.num_classes)

    def forward(self, sample_list, perturbation=None) -> Dict[str, Any]:
        hidden = self.dropout(torch.relu(self.LayerNorm(self.encoder(sample_list.x))))
        return {"scores": self.head(hidden)}


class NumbersDataset(BaseDataset):
    """Gaussian vectors labelled by a fixed random linear teacher (learnable in a few steps)."""

    def __init__(self, dataset_name: str, dataset_type: str, config: Any):
        super().__init__(dataset_name, dataset_type, config)
        offset = {"train": 0, "val": 1, "test": 2}[dataset_type]
        size = int(config.num_examples if dataset_type == "train" else config.num_eval_examples)
        generator = torch.Generator().manual_seed(int(config.seed) + offset)
        self.x = torch.randn(size, int(config.in_dim), generator=generator)
        teacher = torch.randn(int(config.in_dim), int(config.num_classes), generator=torch.Generator().manual_seed(1234))
        self.labels = (self.x @ teacher).argmax(-1)
        for i in config.get("nan_ids", []) or []:
            if dataset_type == "train":
                self.x[i] = float("nan")

    def __len__(self) -> int:
        return self.x.size(0)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"x": self.x[index], "label": self.labels[index], "id": index}

    def lengths(self) -> List[int]:
        return [3 + (7 * i) % 11 for i in range(len(self))]

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        labels = torch.stack([e["label"] for e in examples])
        if self.config.get("one_hot", False):
            labels = nn.functional.one_hot(labels, int(self.config.num_classes)).float()
        return SampleList(
            x=torch.stack([e["x"] for e in examples]),
            targets=labels,
            ids=[e["id"] for e in examples],
            dataset_name=self.dataset_name,
            dataset_type=self.dataset_type,
        )

    def format_predictions(self, batch, output) -> List[Dict[str, Any]]:
        answers = output["scores"].argmax(-1).tolist()
        return [{"id": int(i), "answer": int(a)} for i, a in zip(batch.ids, answers)]

    def write_predictions(self, records, path: str) -> str:
        with open(path, "w") as handle:
            json.dump(sorted(records, key=lambda r: r["id"]), handle)
        return path


@registry.register_builder(DATASET, override=True)
class NumbersBuilder(BaseDatasetBuilder):
    @classmethod
    def config_path(cls) -> str:
        return str(Path(__file__).resolve().parent / "trainer_toys_dataset.yaml")

    def build_dataset(self, split: str) -> NumbersDataset:
        return NumbersDataset(self.dataset_name, split, self.config)


@registry.register_builder(DATASET_B, override=True)
class NumbersBuilderB(NumbersBuilder):
    @classmethod
    def config_path(cls) -> str:
        return str(Path(__file__).resolve().parent / "trainer_toys_dataset_b.yaml")


@registry.register_callback("test_kill_at", override=True)
class KillAt(Callback):
    """SIGKILLs this process right after update ``update`` (after the built-in callbacks ran)."""

    def on_update_end(self, stats) -> None:
        if self.trainer.num_updates == int(self.params["update"]):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


@registry.register_callback("test_record", override=True)
class Record(Callback):
    """Keeps every evaluation report and update's stats on ``trainer.recorded``."""

    def on_train_start(self) -> None:
        self.trainer.recorded = {"val": [], "updates": [], "initial": {k: v.clone() for k, v in self.trainer.raw_model.state_dict().items()}}

    def on_update_end(self, stats) -> None:
        self.trainer.recorded["updates"].append({k: float(v) for k, v in stats.items()})
        self.trainer.recorded.setdefault("sources", []).append(getattr(self.trainer, "last_update_source", None))

    def on_validation_end(self, split, report) -> None:
        self.trainer.recorded["val"].append((self.trainer.num_updates, dict(report)))


def assert_same_optimizer_state(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    """Two checkpoints' optimizer states are equal, tensor by tensor (bit for bit)."""
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][index][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def make_config(save_dir, overrides: Dict[str, Any] = None):
    """defaults.yaml + a small CPU run of the toy model on the numbers dataset + ``overrides``."""
    base = {
        "model": MODEL,
        "datasets": [DATASET],
        "run_type": "train",
        "env": {"save_dir": str(save_dir)},
        "training": {
            "device": "cpu", "seed": 3, "max_updates": 20, "batch_size": 8, "log_interval": 5,
            "evaluation_interval": 10, "checkpoint_interval": 10, "tensorboard": False, "progress_bar": False,
        },
        "optimizer": {"params": {"lr": 1e-2, "weight_decay": 0.01}},
        "scheduler": {"type": "constant"},
        "model_config": {MODEL: {"in_dim": 8, "hidden": 32, "num_classes": 4, "dropout": 0.0, "losses": ["cross_entropy"]}},
        "dataset_config": {DATASET: {"num_examples": 64, "num_eval_examples": 40, "in_dim": 8, "num_classes": 4, "seed": 7}},
    }
    config = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "defaults.yaml"), base, overrides or {})
    return config


def run_config_file(path: str) -> None:
    """What ``mmf_run`` does after composing: seed, then the registered trainer."""
    torch.set_num_threads(1)
    config = OmegaConf.load(path)
    config.training.seed = set_seed(config.training.seed)
    registry.get_trainer_class(config.training.trainer)(config).run()


if __name__ == "__main__":
    run_config_file(sys.argv[1])
