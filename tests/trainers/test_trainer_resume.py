"""Kill-and-resume: N updates straight == N/2 updates, SIGKILL, resume, N/2 more (bit for bit, CPU).

The killed run is a real subprocess; the straight and the resumed runs run in this process (one
thread, seeded as mmf_run seeds), which also checks that nothing depends on process state."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trainer_toys import DATASET, MODEL, assert_same_optimizer_state, make_config
from villa_plugin.checkpoint import load_checkpoint
from villa_plugin.common.device import set_seed
from villa_plugin.trainers.base_trainer import MMFTrainer

HERE = Path(__file__).resolve().parent
TOTAL, KILL_AT = 8, 4


def _run_here(config) -> None:
    """Run in this process, set up as the subprocess (seeded, one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config.training.seed = set_seed(config.training.seed)
        MMFTrainer(config).run()
    finally:
        torch.set_num_threads(threads)


def _run(config, path: Path) -> subprocess.CompletedProcess:
    OmegaConf.save(config, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(HERE / "trainer_toys.py"), str(path)], env=env, capture_output=True, text=True, timeout=300
    )


def _config(save_dir, **extra):
    overrides = {
        "run_type": "train_val",
        "training": {
            "max_updates": TOTAL, "update_frequency": 2, "batching": "token_bucket", "batch_size_tokens": 200,
            "evaluation_interval": 2, "checkpoint_interval": KILL_AT, "log_interval": 1,
        },
        "optimizer": {"params": {"lr": 3e-3}},
        "scheduler": {"type": "warmup_linear", "params": {"warmup_steps": 3}},
        "evaluation": {"metrics": ["accuracy"]},
        "model_config": {MODEL: {"dropout": 0.3}},
        "dataset_config": {DATASET: {"num_examples": 48}},
    }
    return make_config(save_dir, OmegaConf.merge(overrides, extra))


def test_killed_and_resumed_run_equals_straight_run(tmp_path, caplog):
    _run_here(_config(tmp_path / "straight"))

    killed = _run(_config(tmp_path / "resumed", training={"callbacks": [{"type": "test_kill_at", "params": {"update": KILL_AT}}]}), tmp_path / "killed.yaml")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "resumed" / "current.ckpt"))["counts"]["num_updates"] == KILL_AT

    with caplog.at_level("INFO", logger="villa_plugin"):
        _run_here(_config(tmp_path / "resumed", checkpoint={"resume": True}))
    assert f"resumed from {tmp_path / 'resumed' / 'current.ckpt'} at update {KILL_AT}" in caplog.text

    a = torch.load(tmp_path / "straight" / "current.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "current.ckpt", weights_only=True)
    assert a["counts"] == b["counts"] and a["counts"]["num_updates"] == TOTAL
    assert a["counts"]["current_epoch"] >= 1  # the run crossed epoch boundaries
    assert load_checkpoint(str(tmp_path / "straight" / "models" / f"model_{KILL_AT}.ckpt"))["sampler"]["batch_in_epoch"] not in (0, 5)
    assert a["sampler"] == b["sampler"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert_same_optimizer_state(a, b)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
