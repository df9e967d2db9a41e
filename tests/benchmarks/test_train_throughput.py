"""benchmarks/train_throughput.py at a tiny size: the report is self-consistent (the phase split
adds up to the update time, examples/s matches examples per update over its time), the FLOP
probe sees VILLA exact K=3 cost (K+1)x a plain update, and the data suite reports its costs.
Times are never asserted against targets: CPU timings on shared machines are noisy."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
TINY = "--size tiny --token-scale 0.25 --update-frequency 2 --warmup 1 --updates 2 --questions 160 --threads 1"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    bench = load_benchmark()
    data = tmp_path_factory.mktemp("throughput_data")
    out = {}
    for mode in ("plain", "villa"):
        save = tmp_path_factory.mktemp(f"save_{mode}")
        argv = f"{TINY} --mode {mode} --data-dir {data} --save-dir {save}".split()
        out[mode] = bench.main(argv)
    return out


@pytest.mark.parametrize("mode", ["plain", "villa"])
def test_phase_split_adds_up_and_rates_agree(reports, mode):
    r = reports[mode]
    ms = r["ms_per_update"]
    phases = ms["data"] + ms["forward_backward"] + ms["optimizer"] + ms["logging"]
    assert all(ms[p] >= 0 for p in ("data", "forward_backward", "optimizer", "logging"))
    assert abs(ms["total"] - phases) <= 0.05 * ms["total"] + 1.0  # only loop bookkeeping is unaccounted
    assert ms["forward_backward"] > ms["logging"]
    assert r["ms_per_update_min"] <= r["ms_per_update_median"] <= r["ms_per_update_max"]
    seconds_per_update = ms["total"] / 1e3
    assert r["examples_per_s"] * seconds_per_update == pytest.approx(r["examples_per_update"], rel=1e-6)
    assert r["updates_timed"] == 2 and r["tokens_per_micro_batch"] == 1280
    assert 0 < r["mfu"] <= 1.0 and r["peak_memory_mb"] > 0
    assert 0 <= r["overhead_pct"] <= 100


def test_villa_exact_k3_costs_k_plus_one_plain_updates(reports):
    ratio = reports["villa"]["flops_per_example"] / reports["plain"]["flops_per_example"]
    assert ratio == pytest.approx(4.0, rel=0.05)


def test_data_suite_reports_per_example_costs(tmp_path, capsys):
    bench = load_benchmark()
    r = bench.main(f"--suite data --questions 160 --data-examples 64 --data-repeats 1 --data-dir {tmp_path}".split())
    us = r["per_example_us"]
    assert us["getitem"] > 0 and us["collate"] > 0 and us["img_decode_msgpack"] > 0
    assert r["workers_for_gpu_rate"] * r["examples_per_s_per_core"] >= r["gpu_rate"]
    assert 10 <= r["regions_mean"] <= 100 and r["regions_max"] <= 100
    assert "| data |" in capsys.readouterr().out
