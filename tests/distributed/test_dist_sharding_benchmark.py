"""benchmarks/sharding.py runs end to end at world size 2 on CPU and its per-rank accounting
shows what each strategy shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--intermediate", "64", "--vocab", "200",
        "--num-labels", "10", "--batch", "2", "--seq", "6", "--boxes", "3", "--warmup", "1", "--steps", "1"]


def test_sharding_benchmark_accounts_memory_per_rank(tmp_path):
    out = tmp_path / "sharding.json"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sharding.py"), *TINY, "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fairscale_sddp |" in done.stdout
    result = json.loads(out.read_text())
    rows = {(r["strategy"], r["rank"]): r for r in result["rows"]}
    assert {s for s, _ in rows} == {"ddp", "fairscale_sddp", "zero", "fsdp2"} and {r for _, r in rows} == {0, 1}
    full = rows["ddp", 0]["optimizer_state_bytes"]
    assert full > 0 and rows["ddp", 1]["optimizer_state_bytes"] == full
    for name in ("fairscale_sddp", "zero", "fsdp2"):
        per_rank = [rows[name, r]["optimizer_state_bytes"] for r in (0, 1)]
        assert max(per_rank) < full, name  # every rank holds only part of the state...
        assert abs(sum(per_rank) - full) <= 0.01 * full, name  # ...and together they hold all of it once
    assert rows["fsdp2", 0]["param_bytes"] < rows["ddp", 0]["param_bytes"]  # fsdp2 shards parameters too
    assert result["summary"]["zero"]["optimizer_state_bytes_vs_ddp"] < 1.0
