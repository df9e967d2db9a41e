"""Training on several datasets at once: one dataset per update, per-dataset eval and logging,
sampling strategies, and kill-and-resume equal to an uninterrupted run."""
from __future__ import annotations

import json
import signal
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from test_trainer_resume import _run, _run_here
from trainer_toys import DATASET, DATASET_B, MODEL, make_config
from villa_plugin.common.device import set_seed
from villa_plugin.common.errors import ConfigError
from villa_plugin.trainers.base_trainer import MMFTrainer

TOYS_B = OmegaConf.load(__file__.rsplit("/", 1)[0] + "/trainer_toys_dataset_b.yaml")


def _config(tmp_path, overrides=None, datasets=(DATASET, DATASET_B)):
    base = {
        "datasets": list(datasets),
        "dataset_config": {DATASET_B: OmegaConf.to_container(TOYS_B.dataset_config[DATASET_B])},
        "training": {"callbacks": [{"type": "test_record"}], "evaluation_interval": 6, "max_updates": 12},
        "evaluation": {"metrics": ["accuracy"]},
    }
    return make_config(tmp_path / "save", OmegaConf.merge(base, overrides or {}))


def _train(config):
    set_seed(int(config.training.seed))
    trainer = MMFTrainer(config)
    trainer.run()
    return trainer


def test_each_update_draws_from_one_dataset_and_eval_reports_each(tmp_path):
    trainer = _train(_config(tmp_path, {"run_type": "train_val", "training": {"update_frequency": 2}}))
    sources = trainer.recorded["sources"]
    assert len(sources) == 12 and set(sources) == {DATASET, DATASET_B}
    for source, update in zip(sources, trainer.recorded["updates"]):
        other = DATASET_B if source == DATASET else DATASET
        assert f"train/{source}/cross_entropy" in update and f"train/{source}/total_loss" in update
        assert not any(key.startswith(f"train/{other}/") for key in update)  # both micro-batches from one
    # per-dataset positions: together, the datasets gave 2 micro-batches per update
    positions = {name: stream.state_dict() for name, stream in trainer.train_streams.items()}
    per_epoch = {name: stream.batches_per_epoch for name, stream in trainer.train_streams.items()}
    consumed = {name: p["epoch"] * per_epoch[name] + p["batch_in_epoch"] for name, p in positions.items()}
    assert consumed == {name: 2 * n for name, n in Counter(sources).items()}
    (_, report), *_ = trainer.recorded["val"]
    for name in (DATASET, DATASET_B):
        assert f"val/{name}/accuracy" in report and f"val/{name}/cross_entropy" in report
    assert report["val/total_loss"] == pytest.approx(report[f"val/{DATASET}/cross_entropy"] + report[f"val/{DATASET_B}/cross_entropy"])
    # the two datasets are different data: their metrics differ
    assert report[f"val/{DATASET}/cross_entropy"] != report[f"val/{DATASET_B}/cross_entropy"]


def test_explicit_ratios_steer_the_draws(tmp_path):
    overrides = {"training": {"max_updates": 40, "evaluation_interval": 0},
                 "multitasking": {"type": "ratios", "sampling_ratios": {DATASET: 1, DATASET_B: 9}}}
    counts = Counter(_train(_config(tmp_path, overrides)).recorded["sources"])
    assert counts[DATASET_B] >= 30 and counts[DATASET] >= 1  # expected 36 / 4


def test_per_dataset_train_values_are_averaged_over_their_own_updates(tmp_path, caplog):
    overrides = {"training": {"max_updates": 6, "log_interval": 6, "log_format": "json", "evaluation_interval": 0}}
    with caplog.at_level("INFO", logger="villa_plugin"):
        trainer = _train(_config(tmp_path, overrides))
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    for name in (DATASET, DATASET_B):
        own = [u[f"train/{name}/total_loss"] for u in trainer.recorded["updates"] if f"train/{name}/total_loss" in u]
        assert own and line[f"train/{name}/total_loss"] == pytest.approx(sum(own) / len(own), rel=1e-5)


def test_max_epochs_with_several_datasets_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="training.max_epochs=1 is ambiguous.*max_epochs=null"):
        _train(_config(tmp_path, {"training": {"max_epochs": 1}}))


def test_a_dataset_named_twice_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="twice"):
        _train(_config(tmp_path, datasets=(DATASET, DATASET)))


def test_mmf_run_trains_on_two_datasets(tmp_path, capsys):
    from test_trainer_cli import _mmf_run

    argv = ["datasets=test_numbers,test_numbers_b", "run_type=train_val", "training.max_updates=4",
            "training.evaluation_interval=4", "evaluation.metrics=[accuracy]", "multitasking.type=equal"]
    assert _mmf_run(tmp_path / "save", *argv) == 0
    out = capsys.readouterr().out
    evals = [json.loads(line[line.index('{"update"'):]) for line in out.splitlines() if "val/test_numbers_b/accuracy" in line]
    assert evals and "val/test_numbers/accuracy" in evals[0]
    saved = OmegaConf.load(tmp_path / "save" / "config.yaml")
    assert saved.datasets == ["test_numbers", "test_numbers_b"] and saved.dataset_config.test_numbers_b.seed == 11


def test_killed_and_resumed_multi_dataset_run_equals_straight_run(tmp_path):
    total, kill_at = 10, 5
    overrides = {"training": {"max_updates": total, "checkpoint_interval": kill_at, "evaluation_interval": 0,
                              "batching": "token_bucket", "batch_size_tokens": 120, "update_frequency": 2},
                 "model_config": {MODEL: {"dropout": 0.3}}, "run_type": "train"}
    _run_here(_config(tmp_path / "straight", overrides))
    killing = OmegaConf.merge(overrides, {"training": {"callbacks": [{"type": "test_kill_at", "params": {"update": kill_at}}]}})
    killed = _run(_config(tmp_path / "resumed", killing), tmp_path / "killed.yaml")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _run_here(_config(tmp_path / "resumed", OmegaConf.merge(overrides, {"checkpoint": {"resume": True}})))

    a = torch.load(tmp_path / "straight" / "save" / "current.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "save" / "current.ckpt", weights_only=True)
    assert a["counts"]["num_updates"] == b["counts"]["num_updates"] == total
    assert a["sampler"] == b["sampler"] and a["sampler"]["source"]["draws"] == total
    assert set(a["sampler"]["datasets"]) == {DATASET, DATASET_B}
    assert any(p["epoch"] >= 1 for p in a["sampler"]["datasets"].values())  # crossed an epoch boundary
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
