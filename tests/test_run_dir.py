"""``env.save_dir`` protects its contents: a training run into a non-empty one is refused unless it
resumes or ``env.overwrite=true``; a failed start writes nothing into it; bad directory paths and
file-system limits are one-paragraph errors (exit 1). Runs ``mmf_run`` on the trainer toys."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from villa_plugin.checkpoint import load_checkpoint
from villa_plugin.cli import run

TOYS = Path(__file__).resolve().parent / "trainers" / "trainer_toys.py"


def _args(save_dir, *extra):
    return [
        "model=test_toy_mlp", "datasets=test_numbers", f"env.user_dir={TOYS}", f"env.save_dir={save_dir}",
        "run_type=train", "training.device=cpu", "training.num_threads=1", "training.tensorboard=false", "training.max_updates=4",
        "training.checkpoint_interval=2", "training.evaluation_interval=0", "training.log_interval=2", *extra,
    ]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mmf_run: error: ") and "Traceback" not in err, err
    return err


def _snapshot(directory: Path):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_training_into_a_used_save_dir_is_refused_and_names_the_options(tmp_path, capsys):
    save_dir = tmp_path / "run"
    assert run(_args(save_dir)) == 0
    before = _snapshot(save_dir)
    assert run(_args(save_dir, "training.max_updates=2")) == 1
    err = _error(capsys)
    assert f"env.save_dir={save_dir} is not empty" in err
    assert "checkpoint.resume=True" in err and "new env.save_dir" in err and "env.overwrite=true" in err
    assert _snapshot(save_dir) == before


def test_overwrite_replaces_the_previous_runs_checkpoints(tmp_path):
    save_dir = tmp_path / "run"
    assert run(_args(save_dir, "training.max_updates=6")) == 0
    assert sorted(os.listdir(save_dir / "models")) == ["model_2.ckpt", "model_4.ckpt", "model_6.ckpt"]
    assert run(_args(save_dir, "training.max_updates=2", "env.overwrite=true")) == 0
    assert os.listdir(save_dir / "models") == ["model_2.ckpt"]  # old model_4/6 no longer outrank the new run
    assert load_checkpoint(str(save_dir / "current.ckpt"))["counts"]["num_updates"] == 2


def test_failed_resume_leaves_the_run_directory_untouched(tmp_path, capsys):
    save_dir = tmp_path / "run"
    assert run(_args(save_dir)) == 0
    for path in [save_dir / "current.ckpt", *(save_dir / "models").iterdir()]:
        path.write_bytes(b"damaged")
    before = _snapshot(save_dir)
    assert run(_args(save_dir, "checkpoint.resume=True", "training.max_updates=8", "training.seed=9")) == 1
    assert "Cannot read checkpoint" in _error(capsys)
    assert _snapshot(save_dir) == before  # config.yaml and train.log included


def test_evaluation_into_the_run_directory_keeps_its_config(tmp_path):
    save_dir = tmp_path / "run"
    assert run(_args(save_dir)) == 0
    config = (save_dir / "config.yaml").read_bytes()
    assert run(_args(save_dir, "run_type=val", f"checkpoint.resume_file={save_dir}/current.ckpt")) == 0
    assert (save_dir / "config.yaml").read_bytes() == config


@pytest.mark.parametrize("key", ["env.save_dir", "env.cache_dir"])
def test_directory_under_a_regular_file_is_a_user_error(tmp_path, capsys, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = _args(tmp_path / "run") + [f"{key}={blocker}/sub"]
    assert run(args) == 1
    assert f"{key}={blocker}/sub lies under the regular file {blocker}" in _error(capsys)


def test_models_as_a_file_is_a_user_error(tmp_path, capsys):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "models").write_text("not a directory")
    assert run(_args(save_dir, "env.overwrite=true")) == 1
    assert f"{save_dir / 'models'} is a file" in _error(capsys)


def test_file_size_limit_is_a_user_error(tmp_path):
    """RLIMIT_FSIZE below the checkpoint's size (SIGXFSZ ignored, so writes fail with EFBIG)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48_000, 48_000))

    save_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "villa_plugin.cli", *_args(save_dir, "model_config.test_toy_mlp.hidden=512")],
        capture_output=True, text=True, timeout=300, preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"Cannot write checkpoint {save_dir / 'current.ckpt'}: File too large" in done.stderr
    assert "ulimit -f" in done.stderr


def test_resume_uses_the_newest_readable_checkpoint_when_current_is_damaged(tmp_path, capsys):
    save_dir = tmp_path / "run"
    assert run(_args(save_dir, "training.max_updates=4")) == 0
    (save_dir / "current.ckpt").write_bytes(b"PK\x03\x04 half")
    (save_dir / "models" / "model_4.ckpt").write_bytes(b"")
    assert run(_args(save_dir, "checkpoint.resume=True", "training.max_updates=6")) == 0
    out = capsys.readouterr().out
    assert f"{save_dir / 'current.ckpt'} cannot be used" in out
    assert f"resuming from {save_dir / 'models' / 'model_2.ckpt'} instead" in out
    assert f"resumed from {save_dir / 'models' / 'model_2.ckpt'} at update 2" in out
    assert load_checkpoint(str(save_dir / "current.ckpt"))["counts"]["num_updates"] == 6
