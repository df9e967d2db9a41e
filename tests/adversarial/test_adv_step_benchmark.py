"""Smoke test of benchmarks/adv_step.py at a tiny size (times are printed, never asserted)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "adv_step.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("adv_step_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_the_table_and_json(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "adv_step.json"
    argv = "--hidden 16 --layers 1 --batch 2 --seq 4 --boxes 3 --num-labels 5 --steps 1 3"
    result = bench.main(argv.split() + ["--repeats", "1", "--warmup", "0", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| exact_K3 | 3 |" in table and "| official_K1 | 1 |" in table
    saved = json.loads(out.read_text())
    rows = {row["name"]: row for row in saved["rows"]}
    assert set(rows) == {"plain", "official_K1", "official_K3", "exact_K1", "exact_K3"}
    assert result["rows"][0]["name"] == "plain" and rows["plain"]["flop_ratio"] == 1.0
    # FLOP counts are deterministic: the cheaper exact variant does fewer than official at K = 3,
    # and both cost the same at K = 1 (one clean backward either way).
    assert rows["exact_K3"]["flops"] < rows["official_K3"]["flops"]
    assert rows["exact_K1"]["flops"] == rows["official_K1"]["flops"]
    assert all(row["time_s"] > 0 for row in rows.values())
