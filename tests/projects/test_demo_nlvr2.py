"""The bundled NLVR2 demo trains with VILLA through ``mmf_run``, learns, and predicts the NLVR2 CSV."""
from __future__ import annotations

from demo_task_runner import final_metrics, mmf_run, one_torch_thread  # noqa: F401  (autouse fixture)



def test_demo_nlvr2_learns_and_predicts(tmp_path, capsys):
    code, records, seconds = mmf_run(capsys, "projects/villa/demo_nlvr2.yaml", tmp_path)
    assert code == 0
    metrics = final_metrics(records, "val/nlvr2/")
    with capsys.disabled():
        print(f"\ndemo_nlvr2: {metrics} in {seconds:.1f}s")
    assert metrics["val/nlvr2/nlvr2_accuracy"] >= 0.8  # chance: 0.5
    assert metrics["val/nlvr2/nlvr2_consistency"] >= 0.6  # chance: 0.25 (2 image pairs per sentence)
    assert any("train/adv/kl" in r for r in records)  # trained adversarially (villa_free_at)

    predictions = tmp_path / "pred" / "nlvr2.csv"
    code, _, _ = mmf_run(capsys, "projects/villa/demo_nlvr2.yaml", tmp_path, "run_type=predict",
                         f"checkpoint.resume_file={tmp_path}/save/current.ckpt", f"evaluation.predict_file={predictions}")
    assert code == 0
    lines = predictions.read_text().splitlines()
    assert len(lines) == 200 and all(line.split(",")[1] in ("True", "False") for line in lines)
    assert lines[0].startswith("test1-0-0-0,")
