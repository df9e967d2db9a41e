"""Pre-training through the trainers (composed demo_pretrain.yaml, tiny): one (task, dataset) per update
with the mix ratios, per-task validation keys, per-task VILLA settings, one GradScaler per stream, and
kill-and-resume equal to a straight run (task sampler, masks, negatives, weights)."""
from __future__ import annotations

import signal
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from test_trainer_resume import _run
from villa_plugin.common.device import set_seed
from villa_plugin.common.errors import ConfigError
from villa_plugin.config.compose import build_config
from villa_plugin.distributed.base import Strategy
from villa_plugin.registry import registry

TASKS = ("itm", "mlm", "mrfr", "mrckl")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from villa_plugin.tasks.pretrain.demo import materialise_demo

    root = tmp_path_factory.mktemp("pretrain_cache")
    materialise_demo(str(root / "demo" / "pretrain_v1"))
    return root


def _config(tmp_path, cache, *extra):
    return build_config([
        "config=projects/villa/demo_pretrain.yaml", f"env.cache_dir={cache}", f"env.save_dir={tmp_path}/save",
        "training.device=cpu", "training.tensorboard=false", "training.progress_bar=false", "training.batch_size=8",
        "training.max_updates=8", "training.evaluation_interval=0", "training.log_interval=100", "run_type=train",
        "model_config.uniter_pretrain.architecture.hidden_size=32", "model_config.uniter_pretrain.architecture.num_hidden_layers=1",
        *extra,
    ])


def _train(config, callbacks=({"type": "test_record"},)):
    import trainer_toys  # noqa: F401  (registers test_record / test_kill_at)

    config = OmegaConf.merge(config, {"training": {"callbacks": list(callbacks)}})
    set_seed(int(config.training.seed))
    trainer = registry.get_trainer_class(config.training.trainer)(config)
    trainer.final = trainer.run()
    return trainer


def test_one_task_per_update_with_the_mix_ratios_and_per_task_validation(tmp_path, cache):
    trainer = _train(_config(tmp_path, cache, "training.max_updates=60", "run_type=train_val",
                             "model_config.uniter_pretrain.adversarial.adv_training=false"))
    assert trainer.source_sampler.probabilities == pytest.approx(
        {"itm_pretrain_coco": 1 / 3, "mlm_pretrain_coco": 1 / 3, "mrfr_pretrain_coco": 1 / 6, "mrckl_pretrain_coco": 1 / 6})
    counts = Counter(trainer.recorded["sources"])
    assert set(counts) == {f"{t}_pretrain_coco" for t in TASKS} and counts["mlm_pretrain_coco"] > counts["mrfr_pretrain_coco"]
    for source, update in zip(trainer.recorded["sources"], trainer.recorded["updates"]):
        assert f"train/{source}/total_loss" in update  # every micro-batch of the update from that task
        assert not any(f"train/{other}/" in key for key in update for other in counts if other != source)
    report = trainer.final
    for key in ("mlm_accuracy", "mlm_loss", "mrfr_loss", "mrckl_kl", "mrckl_accuracy", "itm_accuracy", "itm_ot_loss"):
        assert f"val/pretrain_coco/{key}" in report, key
    assert 0.0 <= report["val/pretrain_coco/mlm_accuracy"] <= 1.0 and report["val/pretrain_coco/mrckl_kl"] > 0


def test_mix_ratio_declared_but_another_sampling_type_is_an_error(tmp_path, cache):
    with pytest.raises(ConfigError, match="multitasking.type=mix_ratio"):
        _train(_config(tmp_path, cache, "multitasking.type=equal"))


def test_adversarial_steps_only_for_adv_tasks_with_their_consistency(tmp_path, cache):
    trainer = _train(_config(tmp_path, cache, "training.max_updates=16",
                             "model_config.uniter_pretrain.adversarial.adv_tasks=[mlm,mrfr]",
                             "model_config.uniter_pretrain.adversarial.consistency={mrfr: mse}",
                             "model_config.uniter_pretrain.adversarial.modality={mrfr: [image]}"))
    engines = {task: engine.config for task, (engine, _) in trainer.task_engines.items()}
    assert set(engines) == set(TASKS)
    assert engines["mlm"].adv_training and engines["mrfr"].adv_training
    assert not engines["itm"].adv_training and not engines["mrckl"].adv_training
    assert engines["mrfr"].adv_modality == ("image",) and engines["mlm"].adv_modality == ("image", "text")
    for source, update in zip(trainer.recorded["sources"], trainer.recorded["updates"]):
        task = source.split("_")[0]
        adversarial = any(key.startswith(f"train/adv/{task}/") for key in update)
        assert adversarial == (task in ("mlm", "mrfr")), (task, sorted(update))
        if task == "mrfr":  # the MSE consistency between clean and perturbed regressed features
            assert update["train/adv/mrfr/kl"] > 0 and update["train/adv/mrfr/delta_norm_image"] > 0


def test_one_grad_scaler_per_task_stream(tmp_path, cache, monkeypatch):
    # CPU GradScalers stand in for fp16's (which needs CUDA): each stream's scaler steps only on its updates
    monkeypatch.setattr(Strategy, "grad_scaler", lambda self, precision: torch.amp.GradScaler(
        "cpu", init_scale=2.0 ** 8, growth_interval=1000))
    trainer = _train(_config(tmp_path, cache, "training.max_updates=12", "training.checkpoint_interval=12"))
    counts = Counter(trainer.recorded["sources"])
    assert len(trainer.grad_scalers) == 4 and len({id(s) for s in trainer.grad_scalers.values()}) == 4
    state = torch.load(tmp_path / "save" / "current.ckpt", weights_only=True)["fp16_scaler"]["per_stream"]
    assert {name: s["_growth_tracker"] for name, s in state.items()} == {n: counts.get(n, 0) for n in trainer.train_streams}


def test_killed_and_resumed_pretraining_equals_straight_run(tmp_path, cache):
    total, kill_at = 8, 4
    extra = ("training.checkpoint_interval=4", "model_config.uniter_pretrain.dropout=0.1")
    straight = _config(tmp_path / "straight", cache, *extra)
    _train(straight, callbacks=())
    killing = OmegaConf.merge(_config(tmp_path / "resumed", cache, *extra),
                              {"training": {"callbacks": [{"type": "test_kill_at", "params": {"update": kill_at}}]}})
    killed = _run(killing, tmp_path / "killed.yaml")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _train(_config(tmp_path / "resumed", cache, *extra, "checkpoint.resume=true"), callbacks=())
    a = torch.load(tmp_path / "straight" / "save" / "current.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "save" / "current.ckpt", weights_only=True)
    assert a["counts"]["num_updates"] == b["counts"]["num_updates"] == total
    assert a["sampler"] == b["sampler"] and a["sampler"]["source"]["draws"] == total
    assert set(a["sampler"]["datasets"]) == {f"{t}_pretrain_coco" for t in TASKS}
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
