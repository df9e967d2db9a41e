"""benchmarks/pretrain_step.py at a tiny size: one row per (task, variant), the table printed and the
JSON written (times are not compared: CPU timings on shared machines are noisy)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[3] / "benchmarks" / "pretrain_step.py"


def test_pretrain_step_benchmark_measures_every_task(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARK.parent))
    spec = importlib.util.spec_from_file_location("pretrain_step_benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "pretrain_step.json"
    result = bench.main(f"--hidden 32 --layers 1 --batch 2 --seq 4 --boxes 3 --warmup 0 --repeats 1 --threads 1 "
                        f"--out {out}".split())
    table = capsys.readouterr().out
    rows = result["rows"]
    assert [(r["task"], r["variant"]) for r in rows] == [
        (t, v) for t in ("mlm", "mrfr", "mrckl", "itm") for v in ("plain", "official K=3", "exact K=3")]
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert all(r["seconds"] > 0 for r in rows) and table.count("| mlm |") == 3
