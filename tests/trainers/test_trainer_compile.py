"""training.compile: a compiled VILLA run (K=3 exact, the trainer's own loop) gives the eager
run's losses over 20 updates, and dynamo builds a bounded number of graphs although every batch
has its own sequence length (automatic dynamic shapes after the first recompile).

The CPU test compiles with ``aot_eager`` (dynamo capture + AOT autograd, no code generation):
inductor's C++ compilation takes minutes on the shared CI CPUs. benchmarks/gpu_throughput.sh runs
this test on the GPU with inductor (``VILLA_COMPILE_TEST_DEVICE=cuda VILLA_COMPILE_TEST_BACKEND=inductor``)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from villa_plugin.common.device import set_seed
from villa_plugin.config.compose import build_config
from villa_plugin.registry import registry
from villa_plugin.trainers.callbacks import Callback
from villa_plugin.trainers.compile import compile_stats

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
RECORDER = "test_compile_loss_recorder"
DEVICE = os.environ.get("VILLA_COMPILE_TEST_DEVICE", "cpu")
BACKEND = os.environ.get("VILLA_COMPILE_TEST_BACKEND", "aot_eager")
RECORDED = {}


if RECORDER not in registry.names("callback"):
    @registry.register_callback(RECORDER)
    class _LossRecorder(Callback):
        def on_update_end(self, stats):
            RECORDED.setdefault(self.params["run"], []).append(float(stats["train/total_loss"]))


def _bench():
    spec = importlib.util.spec_from_file_location("train_throughput_for_compile", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(bench, data, save, compiled: bool):
    import torch._dynamo

    common = f"--size tiny --token-scale 0.25 --update-frequency 1 --questions 160 --threads 1 --device {DEVICE}"
    args = bench.parse_args((common + (" --compile" if compiled else "")).split())
    run = "compiled" if compiled else "eager"
    argv = bench.trainer_argv(args, str(data), str(save), 20) + [
        f"training.compile_backend={BACKEND}", "training.seed=3",
        "model_config.villa.dropout=0.0",  # dropout draws differ once compiled (functionalised RNG)
        f"training.callbacks=[{{type: {RECORDER}, params: {{run: {run}}}}}]",
    ]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = build_config(argv)
    config.training.seed = set_seed(config.training.seed)  # as mmf_run: the model's init is seeded
    registry.get_trainer_class(config.training.trainer)(config).run()
    return compile_stats()


def test_compiled_and_eager_villa_runs_give_the_same_losses(tmp_path):
    bench = _bench()
    data = bench.write_vqa_shaped_data(str(tmp_path / "data"), 160)
    RECORDED.clear()
    _run(bench, data, tmp_path / "eager", compiled=False)
    stats = _run(bench, data, tmp_path / "compiled", compiled=True)
    eager, compiled = RECORDED["eager"], RECORDED["compiled"]
    assert len(eager) == len(compiled) == 20
    assert len({round(x, 3) for x in eager}) > 10  # the losses move: the comparison means something
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert stats["graph_breaks"] == 0
    assert 1 <= stats["graphs"] <= 6  # 20 batch shapes, bounded graphs (static then dynamic)
