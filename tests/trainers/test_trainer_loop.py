"""The ``mmf`` trainer's loop on a tiny MLP and a synthetic numbers dataset (CPU)."""
from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

from trainer_toys import DATASET, MODEL, make_config
from villa_plugin.checkpoint import load_checkpoint
from villa_plugin.common.device import set_seed
from villa_plugin.common.errors import CheckpointError, ConfigError, TrainingError
from villa_plugin.trainers.base_trainer import MMFTrainer
from villa_plugin.trainers.runtime import RunPlan


def _trainer(tmp_path, overrides=None, run_type="train"):
    config = make_config(tmp_path / "save", {"run_type": run_type, **(overrides or {})})
    set_seed(int(config.training.seed))
    return MMFTrainer(config)


def _record(overrides=None):
    overrides = copy.deepcopy(overrides or {})
    overrides.setdefault("training", {})["callbacks"] = [{"type": "test_record"}]
    return overrides


def test_loss_falls_and_accuracy_rises(tmp_path):
    trainer = _trainer(tmp_path, {"training": {"max_updates": 60}, "evaluation": {"metrics": ["accuracy"]}}, "train_val")
    trainer.setup(RunPlan.parse("train_val"))
    before = trainer.evaluate("val")
    trainer.train()
    after = trainer.evaluate("val")
    key = f"val/{DATASET}/cross_entropy"
    assert after[key] < 0.6 * before[key]
    assert after[f"val/{DATASET}/accuracy"] > before[f"val/{DATASET}/accuracy"] + 0.2
    assert trainer.num_updates == 60


def test_update_frequency_sums_micro_batch_gradients(tmp_path):
    overrides = _record({
        "training": {"max_updates": 1, "update_frequency": 2, "batch_size": 4, "clip_gradients": False},
        "optimizer": {"type": "SGD", "params": {"lr": 0.5, "weight_decay": 0.0}},
    })
    trainer = _trainer(tmp_path, overrides)
    trainer.run()
    initial = trainer.recorded["initial"]
    first_two = trainer.train_loader.batch_sampler.epoch_batches()[:2]
    dataset = trainer.train_dataset
    reference = copy.deepcopy(trainer.raw_model)
    reference.load_state_dict(initial)
    summed = sum(
        F.cross_entropy(reference(dataset.collate([dataset[i] for i in ids]))["scores"], dataset.labels[ids])
        for ids in first_two
    )
    summed.backward()
    for name, param in reference.named_parameters():
        expected = initial[name] - 0.5 * param.grad
        assert torch.allclose(trainer.raw_model.state_dict()[name], expected, atol=1e-6), name
    # averaging instead of summing would have moved the weights half as far
    moved = sum((trainer.raw_model.state_dict()[n] - initial[n]).abs().sum() for n in initial)
    assert moved > 0


def test_default_param_groups_follow_the_no_decay_rule(tmp_path):
    trainer = _trainer(tmp_path, {"optimizer": {"lr_multipliers": {"head": 10}}})
    trainer.setup(RunPlan.parse("train"))
    names = {id(p): n for n, p in trainer.raw_model.named_parameters()}
    groups = [(g["lr_mult"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in trainer.optimizer.param_groups]
    assert groups == [
        (10.0, 0.01, ["head.weight"]),
        (10.0, 0.0, ["head.bias"]),
        (1.0, 0.01, ["encoder.weight"]),
        (1.0, 0.0, ["LayerNorm.bias", "LayerNorm.weight", "encoder.bias"]),
    ]
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_nonfinite_losses_are_skipped_and_counted(tmp_path):
    overrides = {
        "training": {"max_updates": 100, "max_epochs": 1, "batch_size": 1},
        "dataset_config": {DATASET: {"num_examples": 16, "nan_ids": [3, 7]}},
    }
    trainer = _trainer(tmp_path, overrides)
    trainer.run()
    assert trainer.nonfinite_skips == 2
    assert trainer.num_updates == 14
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())
    assert load_checkpoint(str(tmp_path / "save" / "current.ckpt"))["counts"]["nonfinite_skips"] == 2


def test_too_many_nonfinite_losses_stop_the_run(tmp_path):
    overrides = {
        "training": {"max_updates": 100, "max_epochs": 1, "batch_size": 1, "max_nonfinite_skips": 1},
        "dataset_config": {DATASET: {"num_examples": 16, "nan_ids": [3, 7]}},
    }
    with pytest.raises(TrainingError, match="max_nonfinite_skips=1"):
        _trainer(tmp_path, overrides).run()


def test_evaluation_reports_metrics_and_losses(tmp_path):
    overrides = _record({"training": {"max_updates": 20, "evaluation_interval": 10}, "evaluation": {"metrics": ["accuracy"]}})
    trainer = _trainer(tmp_path, overrides, "train_val")
    final = trainer.run()
    assert [u for u, _ in trainer.recorded["val"]] == [10, 20]
    for _, report in trainer.recorded["val"]:
        correct = report[f"val/{DATASET}/accuracy"] * 40  # 40 val examples, each counted once
        assert correct == pytest.approx(round(correct)) and round(correct) > 0
        assert report[f"val/{DATASET}/cross_entropy"] > 0
        assert report["val/total_loss"] == pytest.approx(report[f"val/{DATASET}/cross_entropy"])
    assert f"val/{DATASET}/accuracy" in final  # the final val pass of train_val


def test_val_loss_is_the_mean_over_examples(tmp_path):
    trainer = _trainer(tmp_path, {"evaluation": {"batch_size": 7}}, "val")
    trainer.setup(RunPlan.parse("val"))
    report = trainer.evaluate("val")
    dataset = trainer.datasets["val"][DATASET]
    with torch.no_grad():
        expected = F.cross_entropy(trainer.raw_model(dataset.collate([dataset[i] for i in range(len(dataset))]))["scores"], dataset.labels)
    assert report[f"val/{DATASET}/cross_entropy"] == pytest.approx(float(expected), rel=1e-5)


def test_early_stopping_stops_after_patience_and_writes_best(tmp_path):
    overrides = _record({
        "training": {
            "max_updates": 50, "evaluation_interval": 1, "checkpoint_interval": 0,
            "early_stop": {"enabled": True, "criteria": f"{DATASET}/accuracy", "patience": 2},
        },
        "optimizer": {"params": {"lr": 0.0}},  # lr 1e-8: accuracy never changes, so never improves
        "evaluation": {"metrics": ["accuracy"]},
    })
    trainer = _trainer(tmp_path, overrides)
    trainer.run()
    assert trainer.num_updates == 4
    assert "early stopping" in trainer.stop_reason
    best = load_checkpoint(str(tmp_path / "save" / "best.ckpt"))
    assert best["counts"]["num_updates"] == 1
    assert any(state.get("best_update") == 1 for state in best["callbacks"].values())


def test_predict_writes_the_prediction_file(tmp_path):
    trainer = _trainer(tmp_path, {"evaluation": {"batch_size": 16}}, "predict")
    trainer.run()
    path = tmp_path / "save" / "predictions" / f"{DATASET}_test.json"
    records = json.loads(path.read_text())
    assert [r["id"] for r in records] == list(range(40))
    assert all(0 <= r["answer"] < 4 for r in records)


def test_tensorboard_event_file_and_log_lines(tmp_path, caplog):
    overrides = {"training": {"tensorboard": True, "max_updates": 6, "log_interval": 3, "log_format": "json"}}
    with caplog.at_level("INFO", logger="villa_plugin"):
        _trainer(tmp_path, overrides).run()
    assert glob.glob(str(tmp_path / "save" / "tensorboard" / "events.out.tfevents.*"))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert [line["update"] for line in lines] == [3, 6]
    assert {"train/total_loss", f"train/{DATASET}/cross_entropy", "lr", "updates_per_s", "examples_per_s", "eta"} <= set(lines[0])
    assert lines[0]["examples_per_s"] > 0


def test_resume_without_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="current.ckpt.*resume=False"):
        _trainer(tmp_path, {"checkpoint": {"resume": True}}).run()


def test_resume_pretrained_maps_prefixes(tmp_path):
    source = {"bert.encoder.weight": torch.full((32, 8), 0.25), "bert.encoder.bias": torch.full((32,), -1.0), "cls.x": torch.zeros(3)}
    path = tmp_path / "pretrained.pt"
    torch.save(source, path)
    overrides = {"checkpoint": {"resume_pretrained": True, "resume_file": str(path), "pretrained_state_mapping": {"bert.encoder": "encoder"}}}
    trainer = _trainer(tmp_path, overrides, "val")
    trainer.setup(RunPlan.parse("val"))
    assert torch.equal(trainer.raw_model.encoder.weight, source["bert.encoder.weight"])
    assert torch.equal(trainer.raw_model.encoder.bias, source["bert.encoder.bias"])


def test_resume_with_wrong_shapes_names_key_and_shapes(tmp_path):
    _trainer(tmp_path, {"training": {"max_updates": 2}}).run()
    bigger = {"model_config": {MODEL: {"hidden": 16}}, "checkpoint": {"resume": True}}
    with pytest.raises(CheckpointError, match=r"encoder.weight.*\(32, 8\).*\(16, 8\)"):
        _trainer(tmp_path, bigger).run()


def test_checkpoints_keep_the_last_n(tmp_path):
    _trainer(tmp_path, {"training": {"max_updates": 8, "checkpoint_interval": 2}, "checkpoint": {"max_to_keep": 2}}).run()
    kept = sorted(os.listdir(tmp_path / "save" / "models"))
    assert kept == ["model_6.ckpt", "model_8.ckpt"]
    state = torch.load(tmp_path / "save" / "current.ckpt", weights_only=True)
    assert state["counts"]["num_updates"] == 8
    assert isinstance(state["config"], str) and "test_toy_mlp" in state["config"]


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fp16"):
        _trainer(tmp_path, {"training": {"precision": "fp16"}}).run()


def test_bf16_autocast_trains_on_cpu(tmp_path):
    trainer = _trainer(tmp_path, {"training": {"precision": "bf16", "max_updates": 3}})
    trainer.run()
    assert trainer.num_updates == 3 and all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_resume_best_and_reset_counts(tmp_path):
    early = {
        "training": {"max_updates": 50, "evaluation_interval": 1, "checkpoint_interval": 0,
                     "early_stop": {"enabled": True, "criteria": f"val/{DATASET}/accuracy", "patience": 2}},
        "optimizer": {"params": {"lr": 0.0}},
        "evaluation": {"metrics": ["accuracy"]},
    }
    _trainer(tmp_path, early).run()
    best = _trainer(tmp_path, {"checkpoint": {"resume_best": True}}, "val")
    best.setup(RunPlan.parse("val"))
    assert best.num_updates == 1
    fresh_counts = _trainer(tmp_path, {"checkpoint": {"resume": True, "reset": {"counts": True}}}, "val")
    fresh_counts.setup(RunPlan.parse("val"))
    current = load_checkpoint(str(tmp_path / "save" / "current.ckpt"))
    assert fresh_counts.num_updates == 0 and current["counts"]["num_updates"] == 4
    for key, value in current["model"].items():
        assert torch.equal(fresh_counts.raw_model.state_dict()[key], value)


class _ExtraStatsTrainer(MMFTrainer):
    """What a free-AT trainer does: replace run_training_batch, return extra values to log."""

    def run_training_batch(self, batch, is_last_micro_batch):
        stats = super().run_training_batch(batch, is_last_micro_batch)
        stats["train/test_numbers/delta_norm"] = torch.tensor([1.0, 3.0])
        return stats


def test_values_a_subclass_returns_are_logged(tmp_path, caplog):
    config = make_config(tmp_path / "save", {"training": {"max_updates": 4, "log_interval": 2, "log_format": "json", "update_frequency": 2}})
    with caplog.at_level("INFO", logger="villa_plugin"):
        _ExtraStatsTrainer(config).run()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert [line["train/test_numbers/delta_norm"] for line in lines] == [2.0, 2.0]


def test_update_frequency_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="update_frequency"):
        _trainer(tmp_path, {"training": {"update_frequency": 0}}).run()


class _SeamsTrainer(MMFTrainer):
    """Overrides the public build steps, detectron2 style."""

    def build_datasets(self, plan):
        datasets = super().build_datasets(plan)
        self.built_splits = sorted(datasets)
        return datasets

    def build_model(self):
        model = super().build_model()
        model.built_by_seam = True
        return model

    def build_optimizer(self, param_groups):
        return torch.optim.SGD(param_groups, lr=0.1, momentum=0.9)


def test_build_seams_are_used(tmp_path):
    trainer = _SeamsTrainer(make_config(tmp_path / "save", {"run_type": "train", "training": {"max_updates": 2}}))
    trainer.setup(RunPlan.parse("train"))
    trainer.train()
    assert trainer.built_splits == ["train"] and trainer.raw_model.built_by_seam
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.num_updates == 2
    assert trainer.optimizer.state and all("momentum_buffer" in s for s in trainer.optimizer.state.values())


@pytest.mark.parametrize("key", ["training.evaluation_interval", "training.checkpoint_interval", "training.batching"])
def test_settings_come_from_the_composed_config_only(tmp_path, key):
    """No second default in code: a config without the key (not composed from defaults.yaml) is an
    error naming it, instead of silently using a value the YAML does not show."""
    config = make_config(tmp_path / "save", {"training": {"max_updates": 2}})
    section, name = key.split(".")
    del config[section][name]
    with pytest.raises(ConfigError, match=rf'Config key "{key}" is missing.*configs/defaults.yaml'):
        MMFTrainer(config).run()


def test_backward_can_keep_the_graph(tmp_path):
    trainer = _trainer(tmp_path)
    weight = torch.ones(3, requires_grad=True)
    loss = (weight * 2).sum()
    trainer.backward(loss, retain_graph=True)
    trainer.backward(loss)  # the graph is still there for a second pass
    assert torch.equal(weight.grad, torch.full((3,), 4.0))


def test_final_evaluation_is_labelled_with_the_best_checkpoints_update(tmp_path, caplog):
    overrides = {
        "training": {
            "max_updates": 4, "evaluation_interval": 1, "checkpoint_interval": 0,
            "early_stop": {"enabled": False, "criteria": f"{DATASET}/accuracy"},
        },
        "optimizer": {"params": {"lr": 0.0}},  # accuracy never changes: update 1 stays the best
        "evaluation": {"metrics": ["accuracy"]},
    }
    with caplog.at_level("INFO", logger="villa_plugin"):
        _trainer(tmp_path, overrides, "train_val").run()
    evaluations = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation")]
    assert evaluations[-1].startswith("evaluation of best.ckpt (the best checkpoint, update 1): ")
    assert not any(m.startswith("evaluation at update 4: ") for m in evaluations[4:])
