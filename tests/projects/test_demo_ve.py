"""The bundled SNLI-VE demo trains with VILLA through ``mmf_run``, learns, and predicts the JSON list."""
from __future__ import annotations

import json

from demo_task_runner import final_metrics, mmf_run, one_torch_thread  # noqa: F401  (autouse fixture)



def test_demo_snli_ve_learns_and_predicts(tmp_path, capsys):
    code, records, seconds = mmf_run(capsys, "projects/villa/demo_snli_ve.yaml", tmp_path)
    assert code == 0
    metrics = final_metrics(records, "val/visual_entailment/")
    with capsys.disabled():
        print(f"\ndemo_snli_ve: {metrics} in {seconds:.1f}s")
    # chance 1/3; the text alone (neutral vs the rest) gives ~0.66, so 0.9 needs the image
    assert metrics["val/visual_entailment/accuracy"] >= 0.9
    assert any("train/adv/kl" in r for r in records)

    predictions = tmp_path / "pred" / "ve.json"
    code, _, _ = mmf_run(capsys, "projects/villa/demo_snli_ve.yaml", tmp_path, "run_type=predict",
                         f"checkpoint.resume_file={tmp_path}/save/current.ckpt", f"evaluation.predict_file={predictions}")
    assert code == 0
    rows = json.loads(predictions.read_text())
    assert rows and all(set(r) == {"pair_id", "label"} and r["label"] in ("contradiction", "entailment", "neutral") for r in rows)
