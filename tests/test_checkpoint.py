"""Atomic checkpoint files, safe loading, key/shape checks, prefix maps, RNG round trip."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import villa_plugin.checkpoint as ckpt
from villa_plugin.common.errors import CheckpointError
from villa_plugin.optim import AdamW, WarmupLinear, build_param_groups


def _state(value: float):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    optimizer = AdamW(build_param_groups(model, {"no_decay": ["bias"], "params": {"weight_decay": 0.1}}), lr=1e-3, betas=(0.9, 0.98))
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    scheduler = WarmupLinear(optimizer, base_lr=1e-3, warmup_steps=2, num_training_steps=10)
    scheduler.step()
    with torch.no_grad():  # recognisable weights
        for p in model.parameters():
            p.fill_(value)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "fp16_scaler": None,
        "rng": ckpt.rng_state(),
        "sampler": {"epoch": 1, "batch_in_epoch": 3, "seed": 5},
        "counts": {"num_updates": 7, "current_epoch": 1, "nonfinite_skips": 0},
        "callbacks": {"2:EarlyStoppingCallback": {"best_value": 0.5, "best_update": 4}},
        "config": "training:\n  max_updates: 10\n",
    }


def test_state_loads_with_weights_only(tmp_path):
    path = str(tmp_path / "a.ckpt")
    ckpt.save_checkpoint(path, _state(0.5))
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["0.weight"], torch.full((4, 3), 0.5))
    assert loaded["optimizer"]["param_groups"][0]["lr_mult"] == 1.0
    assert loaded["lr_scheduler"] == {"last_step": 1, "base_lr": 1e-3}
    assert loaded["counts"]["num_updates"] == 7


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "current.ckpt")
    ckpt.save_checkpoint(path, _state(0.5))
    real_save = torch.save

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match=r"Cannot write checkpoint .*current\.ckpt: disk full"):
        ckpt.save_checkpoint(path, _state(1.5))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["0.weight"], torch.full((4, 3), 0.5))
    assert os.listdir(tmp_path) == ["current.ckpt"]


def test_checkpoint_files_current_best_and_keep_last_n(tmp_path):
    files = ckpt.CheckpointFiles(str(tmp_path), max_to_keep=2)
    for update in range(1, 5):
        files.save(_state(float(update)), update, keep=True, best=update == 2)
    assert sorted(os.listdir(tmp_path / "models")) == ["model_3.ckpt", "model_4.ckpt"]
    assert torch.equal(ckpt.load_checkpoint(files.current)["model"]["0.bias"], torch.full((4,), 4.0))
    assert torch.equal(ckpt.load_checkpoint(files.best)["model"]["0.bias"], torch.full((4,), 2.0))
    assert torch.equal(ckpt.load_checkpoint(files.model_file(3))["model"]["0.bias"], torch.full((4,), 3.0))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_missing_file_says_how_to_start_fresh(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere\.ckpt.*checkpoint\.resume=False"):
        ckpt.load_checkpoint(str(tmp_path / "nothere.ckpt"))


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="Cannot read checkpoint .*bad.ckpt"):
        ckpt.load_checkpoint(str(path))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"config": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="Cannot read"):
        ckpt.load_checkpoint(str(path))


class _Opaque:
    pass


def test_shape_mismatch_names_key_and_shapes():
    model = nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match=r"weight: .*\(5, 3\).*\(4, 3\)"):
        ckpt.load_model_weights(model, {"weight": torch.zeros(5, 3), "bias": torch.zeros(4)})


def test_strict_load_names_missing_and_unexpected_keys():
    model = nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match=r"missing keys \['bias'\].*unexpected keys \['extra'\]"):
        ckpt.load_model_weights(model, {"weight": torch.zeros(4, 3), "extra": torch.zeros(1)})
    missing, unexpected = ckpt.load_model_weights(model, {"weight": torch.ones(4, 3), "extra": torch.zeros(1)}, strict=False)
    assert (missing, unexpected) == (["bias"], ["extra"])
    assert torch.equal(model.weight, torch.ones(4, 3))


def test_map_prefixes_renames_and_filters():
    weights = {"bert.encoder.w": 1, "bert.encoder.b": 2, "bert.pooler.w": 3, "cls.w": 4}
    assert ckpt.map_prefixes(weights, {"bert.encoder": "uniter.encoder"}) == {"uniter.encoder.w": 1, "uniter.encoder.b": 2}
    assert ckpt.map_prefixes(weights, {"bert": ""}) == {"encoder.w": 1, "encoder.b": 2, "pooler.w": 3}
    assert ckpt.map_prefixes(weights, {}) == weights
    assert ckpt.model_weights({"model": {"a": 1}, "optimizer": {}}) == {"a": 1}
    assert ckpt.model_weights({"a": 1}) == {"a": 1}


def test_rng_state_round_trip_through_a_safe_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = str(tmp_path / "rng.ckpt")
    ckpt.save_checkpoint(path, {"rng": ckpt.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_kept_checkpoints_are_independent_copies(tmp_path):
    files = ckpt.CheckpointFiles(str(tmp_path), max_to_keep=3)
    files.save(_state(1.0), 1, keep=True, best=True)
    current, newest, best = os.stat(files.current), os.stat(files.model_file(1)), os.stat(files.best)
    assert current.st_nlink == newest.st_nlink == best.st_nlink == 1
    assert len({current.st_ino, newest.st_ino, best.st_ino}) == 3
    with open(files.current, "r+b") as handle:  # damage to current.ckpt leaves its backups whole
        handle.truncate(100)
    assert torch.equal(ckpt.load_checkpoint(files.model_file(1))["model"]["0.bias"], torch.full((4,), 1.0))
    assert torch.equal(ckpt.load_checkpoint(files.best)["model"]["0.bias"], torch.full((4,), 1.0))


def test_resume_falls_back_to_the_newest_readable_checkpoint_and_says_so(tmp_path, caplog):
    files = ckpt.CheckpointFiles(str(tmp_path), max_to_keep=3)
    for update in (2, 4, 6):
        files.save(_state(float(update)), update, keep=True)
    with open(files.current, "wb") as handle:
        handle.write(b"PK\x03\x04 half a checkpoint")
    with open(files.model_file(6), "wb") as handle:
        handle.write(b"")
    with caplog.at_level("WARNING", logger="villa_plugin.checkpoint"):
        state, path = files.load_latest()
    assert path == files.model_file(4) and torch.equal(state["model"]["0.bias"], torch.full((4,), 4.0))
    assert f"{files.current} cannot be used" in caplog.text and f"resuming from {files.model_file(4)}" in caplog.text
    assert f"also unreadable: {files.model_file(6)}" in caplog.text


def test_resume_with_no_readable_checkpoint_names_them_all(tmp_path):
    files = ckpt.CheckpointFiles(str(tmp_path), max_to_keep=3)
    files.save(_state(1.0), 1, keep=True)
    for path in (files.current, files.model_file(1)):
        with open(path, "wb") as handle:
            handle.write(b"junk")
    with pytest.raises(CheckpointError, match=r"Cannot read checkpoint .*current\.ckpt.*No readable fallback.*model_1\.ckpt"):
        files.load_latest()
