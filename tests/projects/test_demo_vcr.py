"""The bundled VCR demo trains with VILLA (image + text) through ``mmf_run``, learns, and predicts
the leaderboard CSV (20 rows per test question)."""
from __future__ import annotations

import csv

from demo_task_runner import final_metrics, mmf_run, one_torch_thread  # noqa: F401  (autouse fixture)

from villa_plugin.tasks.vcr.dataset import CSV_HEADER



def test_demo_vcr_learns_and_predicts(tmp_path, capsys):
    code, records, seconds = mmf_run(capsys, "projects/villa/demo_vcr.yaml", tmp_path)
    assert code == 0
    metrics = final_metrics(records, "val/vcr/")
    with capsys.disabled():
        print(f"\ndemo_vcr: {metrics} in {seconds:.1f}s")
    # chance: Q->A 0.25, QA->R 0.25, Q->AR 0.0625; text alone gets 0.5 / 0.5 / 0.25 (two answers are never right)
    assert metrics["val/vcr/vcr_q_a"] >= 0.9 and metrics["val/vcr/vcr_qa_r"] >= 0.9 and metrics["val/vcr/vcr_q_ar"] >= 0.8
    assert any("train/adv/delta_norm_image" in r for r in records)

    predictions = tmp_path / "pred" / "vcr.csv"
    code, _, _ = mmf_run(capsys, "projects/villa/demo_vcr.yaml", tmp_path, "run_type=predict",
                         f"checkpoint.resume_file={tmp_path}/save/current.ckpt", f"evaluation.predict_file={predictions}")
    assert code == 0
    rows = list(csv.reader(open(predictions)))
    assert rows[0] == CSV_HEADER and len(rows) == 1 + 60
    probabilities = [float(x) for x in rows[1][1:]]
    assert all(abs(sum(probabilities[g:g + 4]) - 1) < 1e-5 for g in range(0, 20, 4))
