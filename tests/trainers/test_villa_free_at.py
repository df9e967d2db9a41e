"""The ``villa_free_at`` trainer: plain equivalence, the adversarial update, sync and logging."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict

import pytest
import torch
from torch import nn

from trainer_toys import DATASET, make_config
from villa_plugin.adversarial import AdversarialConfig, FreeATEngine
from villa_plugin.common.device import set_seed
from villa_plugin.common.errors import ConfigError
from villa_plugin.models.base_model import BaseModel
from villa_plugin.registry import registry
from villa_plugin.trainers.base_trainer import MMFTrainer
from villa_plugin.trainers.runtime import RunPlan
from villa_plugin.trainers.villa_free_at import VillaFreeATTrainer

MODEL = "test_toy_villa"


@registry.register_model(MODEL, override=True)
class ToyVilla(BaseModel):
    """x[:, :D/2] is the "text" token, x[:, D/2:] the "image" region; both take perturbations."""

    kl_reduction = "sum_classes_mean"

    def build(self) -> None:
        c = self.config
        self.half = int(c.in_dim) // 2
        self.text_proj = nn.Linear(self.half, c.hidden)
        self.img_linear = nn.Linear(int(c.in_dim) - self.half, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.num_classes)

    def forward(self, sample_list, perturbation=None) -> Dict[str, Any]:
        perturbation = perturbation or {}
        words, feats = sample_list.x[:, None, : self.half], sample_list.x[:, None, self.half :]
        if perturbation.get("text") is not None:
            words = words + perturbation["text"]
        if perturbation.get("image") is not None:
            feats = feats + perturbation["image"]
        hidden = self.dropout(torch.relu(self.LayerNorm((self.text_proj(words) + self.img_linear(feats))[:, 0])))
        return {"scores": self.head(hidden)}

    def perturbation_shapes(self, sample_list) -> Dict[str, tuple]:
        b, d = sample_list.x.shape
        return {"text": (b, 1, self.half), "image": (b, 1, d - self.half)}

    def perturbation_masks(self, sample_list) -> Dict[str, Any]:
        return {"text": None, "image": None}  # one real token and one real region per row


def villa_config(tmp_path, adversarial=None, training=None, optimizer=None, model=MODEL):
    block = {"adv_training": True, "adv_modality": ["image", "text"], "adv_steps": 3, "adv_lr_txt": 0.1,
             "adv_lr_img": 0.2, "adv_kl_weight": 1.5}  # fmt: skip
    block.update(adversarial or {})
    model_config = {"in_dim": 8, "hidden": 32, "num_classes": 4, "dropout": 0.1, "losses": ["cross_entropy"], "adversarial": block}
    overrides = {
        "model": model,
        "training": {"trainer": "villa_free_at", "max_updates": 4, **(training or {})},
        "model_config": {model: model_config},
    }
    if optimizer:
        overrides["optimizer"] = optimizer
    return make_config(tmp_path / "save", overrides)


def train(trainer_cls, config):
    set_seed(int(config.training.seed))
    trainer = trainer_cls(config)
    trainer.run()
    return trainer


def test_adv_training_false_equals_the_plain_trainer_bit_for_bit(tmp_path):
    config = villa_config(tmp_path, {"adv_training": False}, {"max_updates": 6})
    plain = train(MMFTrainer, copy.deepcopy(config))
    villa = train(VillaFreeATTrainer, copy.deepcopy(config))
    for (name, a), b in zip(plain.raw_model.state_dict().items(), villa.raw_model.state_dict().values()):
        assert torch.equal(a, b), name
    # and adversarial training really changes the result
    adv = train(VillaFreeATTrainer, villa_config(tmp_path, training={"max_updates": 6}))
    assert any(not torch.equal(a, b) for a, b in zip(plain.raw_model.state_dict().values(), adv.raw_model.state_dict().values()))


@pytest.mark.parametrize("formulation", ["exact", "official"])
def test_one_update_is_the_engine_step_then_sgd(tmp_path, formulation):
    adversarial = {"formulation": formulation}
    config = villa_config(
        tmp_path, adversarial, {"max_updates": 1, "clip_gradients": False, "callbacks": [{"type": "test_record"}]},
        {"type": "SGD", "params": {"lr": 0.5, "weight_decay": 0.0}},
    )  # fmt: skip
    config.model_config[MODEL].dropout = 0.0
    trainer = train(VillaFreeATTrainer, config)
    initial = trainer.recorded["initial"]
    ids = trainer.train_loader.batch_sampler.epoch_batches()[0]
    dataset = trainer.train_dataset
    batch = dataset.collate([dataset[i] for i in ids])
    reference = copy.deepcopy(trainer.raw_model)
    reference.load_state_dict(initial)
    reference.zero_grad(set_to_none=True)
    engine = FreeATEngine(AdversarialConfig.from_model_config(config))
    engine.step(reference, batch, backward=lambda loss, retain_graph=False: loss.backward(retain_graph=retain_graph), kl_reduction="sum_classes_mean")
    for name, param in reference.named_parameters():
        expected = initial[name] - 0.5 * param.grad
        torch.testing.assert_close(trainer.raw_model.state_dict()[name], expected, rtol=0, atol=1e-6)
    logged = trainer.recorded["updates"][0]
    for key in ("train/total_loss", "train/adv/task_loss", "train/adv/kl", "train/adv/clean_task_loss",
                "train/adv/delta_norm_text", "train/adv/delta_norm_image", "train/adv/ascent_skips"):  # fmt: skip
        assert key in logged, key
    assert logged["train/adv/kl"] > 0 and logged["train/adv/ascent_skips"] == 0
    assert 0 < logged["train/adv/delta_norm_text"] <= 2 * 0.1 + 1e-6


def test_sync_only_on_the_last_step_of_the_last_micro_batch(tmp_path):
    config = villa_config(tmp_path, {"adv_steps": 2}, {"max_updates": 1, "update_frequency": 2, "batch_size": 4})
    set_seed(int(config.training.seed))
    trainer = VillaFreeATTrainer(config)
    trainer.setup(RunPlan.parse("train"))
    seen = []

    def sync_context(model, is_last):
        seen.append(is_last)
        return contextlib.nullcontext()

    trainer.strategy.sync_context = sync_context
    trainer.train()
    # per micro-batch: one context for clean + steps 0..K-2, one for the last step
    assert seen == [False, False, False, True]


def test_model_without_perturbations_is_a_config_error(tmp_path):
    config = villa_config(tmp_path, model="test_toy_mlp")
    with pytest.raises(ConfigError, match="does not accept perturbations"):
        train(VillaFreeATTrainer, config)


def test_bad_adversarial_block_fails_before_setup(tmp_path):
    config = villa_config(tmp_path, {"adv_modality": "text"})
    with pytest.raises(ConfigError, match=f"model_config.{MODEL}.adversarial.adv_modality"):
        train(VillaFreeATTrainer, config)


def test_adversarial_training_learns(tmp_path):
    config = villa_config(tmp_path, training={"max_updates": 40, "callbacks": [{"type": "test_record"}]},
                          optimizer={"params": {"lr": 1e-2, "weight_decay": 0.01}})  # fmt: skip
    config.run_type = "train_val"
    config.evaluation.metrics = ["accuracy"]
    trainer = train(VillaFreeATTrainer, config)
    updates = trainer.recorded["updates"]
    assert sum(u["train/adv/task_loss"] for u in updates[-5:]) < sum(u["train/adv/task_loss"] for u in updates[:5])
    assert trainer.recorded["val"], "train_val must have evaluated"
    assert trainer.recorded["val"][-1][1][f"val/{DATASET}/accuracy"] > 0.4  # chance: 0.25


def test_adv_training_under_the_plain_trainer_is_a_config_error(tmp_path):
    """Silent fallback 1: the plain ``mmf`` trainer would train a VILLA config without adversaries."""
    config = villa_config(tmp_path)
    config.training.trainer = "mmf"
    with pytest.raises(ConfigError, match=rf"model_config.{MODEL}.adversarial.adv_training=true, but training.trainer=mmf .*training.trainer=villa_free_at.*adv_training=false"):
        train(MMFTrainer, config)
    config.model_config[MODEL].adversarial.adv_training = False  # the plain baseline stays allowed
    assert train(MMFTrainer, config).num_updates == 4
