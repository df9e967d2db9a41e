"""Preemption: a real SIGTERM (or SIGUSR1) to a running ``mmf_run`` ends training with a checkpoint
and exit code 75; ``checkpoint.resume=True`` then finishes bit-identical to an uninterrupted run.
Under torchrun, a signal that reaches one rank stops every rank at the same update."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_toys import assert_same_optimizer_state
from villa_plugin.checkpoint import load_checkpoint
from villa_plugin.cli import run
from villa_plugin.trainers.preemption import EXIT_PREEMPTED, StopSignals

HERE = Path(__file__).resolve().parent
TOYS = HERE / "preemption_toys.py"
TOTAL = 200
DDP_TOTAL = 60  # two torchrun launches are slow: a shorter run


def _args(save_dir, *extra, sleep=0.0, total=TOTAL):
    return [
        "model=test_toy_mlp", "datasets=test_numbers", f"env.user_dir={TOYS}", f"env.save_dir={save_dir}",
        "run_type=train", "training.device=cpu", "training.num_threads=1", "training.tensorboard=false",
        f"training.max_updates={total}", "training.checkpoint_interval=50", "training.log_interval=50",
        "training.evaluation_interval=0", "training.batch_size=8", "model_config.test_toy_mlp.dropout=0.3",
        "optimizer.params.lr=3e-3", f"training.callbacks=[{{type: test_sleep, params: {{seconds: {sleep}}}}}]", *extra,
    ]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _start(command):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())


def _wait_for(process, marker, timeout=120.0):
    """Lines of ``process``'s output up to the first holding ``marker``."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return seen
    process.kill()
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(seen)[-3000:]}")


def _assert_same_training_state(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a["counts"] == b["counts"] and a["counts"]["num_updates"] == TOTAL
    assert a["sampler"] == b["sampler"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert_same_optimizer_state(a, b)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_sigterm_at_a_random_moment_then_resume_is_bit_identical(tmp_path, capsys):
    delay = random.uniform(0.05, 1.2)
    save_dir = tmp_path / "interrupted"
    process = _start([sys.executable, "-m", "villa_plugin.cli", *_args(save_dir, sleep=0.01)])
    before = _wait_for(process, "training from update 0")
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    output = "".join(before) + process.communicate(timeout=120)[0]
    assert process.returncode == EXIT_PREEMPTED, f"delay {delay:.2f}s\n{output[-3000:]}"
    stopped_at = load_checkpoint(str(save_dir / "current.ckpt"))["counts"]["num_updates"]
    assert 0 < stopped_at < TOTAL, output[-3000:]
    assert f"SIGTERM: training stopped after update {stopped_at} of {TOTAL}; checkpoint saved to {save_dir / 'current.ckpt'}" in output
    assert load_checkpoint(str(save_dir / "models" / f"model_{stopped_at}.ckpt"))["counts"]["num_updates"] == stopped_at
    assert "Resume with: mmf_run model=test_toy_mlp" in output and output.rstrip().endswith("checkpoint.resume=True")
    assert "Traceback" not in output

    assert run(_args(save_dir, "checkpoint.resume=True")) == 0
    assert f"at update {stopped_at}" in capsys.readouterr().out
    assert run(_args(tmp_path / "straight")) == 0
    _assert_same_training_state(tmp_path / "straight" / "current.ckpt", save_dir / "current.ckpt")


def test_sigterm_to_the_whole_process_group_with_dataloader_workers(tmp_path):
    """SLURM signals every process of a task: the DataLoader workers must not die of it."""
    save_dir = tmp_path / "workers"
    command = [sys.executable, "-m", "villa_plugin.cli",
               *_args(save_dir, "training.num_workers=2", "training.persistent_workers=true", sleep=0.02, total=100)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                               start_new_session=True)
    before = _wait_for(process, "training from update 0")
    time.sleep(random.uniform(0.3, 1.0))
    os.killpg(process.pid, signal.SIGTERM)
    output = "".join(before) + process.communicate(timeout=120)[0]
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    stopped_at = load_checkpoint(str(save_dir / "current.ckpt"))["counts"]["num_updates"]
    assert 0 < stopped_at < 100 and "DataLoader worker" not in output, output[-3000:]


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == previous
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: stop at once
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert signals.received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_torchrun_signal_to_one_rank_stops_every_rank_with_one_checkpoint(tmp_path):
    save_dir = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "villa_plugin.cli"]
    common = ("distributed.strategy=ddp", "training.batch_size=4")
    process = _start([*torchrun, *_args(save_dir, *common, sleep=0.03, total=DDP_TOTAL)])
    before = _wait_for(process, "training from update 0")
    time.sleep(random.uniform(0.3, 1.0))
    workers = _children(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)  # one rank only: the ranks must agree before saving
    output = "".join(before) + process.communicate(timeout=120)[0]
    assert process.returncode != 0 and "exitcode  : 75" in output, output[-4000:]
    stopped_at = load_checkpoint(str(save_dir / "current.ckpt"))["counts"]["num_updates"]
    assert 0 < stopped_at < DDP_TOTAL, output[-3000:]
    assert f"training stopped after update {stopped_at} of {DDP_TOTAL}" in output
    assert "failed, ending this process" not in output

    resumed = subprocess.run([*torchrun, *_args(save_dir, *common, "checkpoint.resume=True", total=DDP_TOTAL)],
                             capture_output=True, text=True, env=_env(), timeout=180)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert f"at update {stopped_at}" in resumed.stdout
    assert load_checkpoint(str(save_dir / "current.ckpt"))["counts"]["num_updates"] == DDP_TOTAL
