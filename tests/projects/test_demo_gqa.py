"""`mmf_run config=projects/villa/demo_gqa.yaml`: LXMERT + VILLA (text δ 1e-2) learns the GQA demo
through the `gqa` builder, and `run_type=predict` writes the GQA server's submission JSON.

The schedule is cut to UPDATES of the demo's 600 (K=2 instead of 3); the full run reaches 0.69
(docs/lxmert.md). Chance is 1/20; the most frequent answer scores ~0.14 (measured after 80 updates:
0.31, ~15 s on a quiet machine).
"""
from __future__ import annotations

import json

from demo_task_runner import final_metrics, mmf_run, one_torch_thread  # noqa: F401  (autouse fixture)

CONFIG = "projects/villa/demo_gqa.yaml"
UPDATES = 80
SHORT_SCHEDULE = (f"training.max_updates={UPDATES}", f"training.evaluation_interval={UPDATES}",
                  f"training.checkpoint_interval={UPDATES}", f"scheduler.params.warmup_steps={UPDATES // 10}",
                  "model_config.lxmert.adversarial.adv_steps=2")


def _majority_answer(files) -> float:
    train = [next(iter(r["label"])) for name in ("train", "valid") for r in json.load(open(files[name]))]
    best = max(set(train), key=train.count)
    testdev = [next(iter(r["label"])) for r in json.load(open(files["testdev"]))]
    return testdev.count(best) / len(testdev)


def test_demo_gqa_learns_and_writes_the_submission(tmp_path, capsys):
    code, records, seconds = mmf_run(capsys, CONFIG, tmp_path, *SHORT_SCHEDULE)
    assert code == 0
    accuracy = final_metrics(records, "val/gqa/")["val/gqa/gqa_accuracy"]
    from villa_plugin.tasks.gqa.demo import paths

    majority = _majority_answer(paths(str(tmp_path / "cache" / "demo" / "gqa_v1"))["files"])
    with capsys.disabled():
        print(f"\ndemo_gqa: gqa_accuracy {accuracy:.3f} after {UPDATES} updates in {seconds:.1f}s "
              f"(chance 0.050, most frequent answer {majority:.3f})")
    assert majority < 0.3
    assert accuracy >= majority + 0.1
    assert any("train/adv/delta_norm_text" in r for r in records) and not any("delta_norm_image" in str(r) for r in records)

    submission = tmp_path / "submit_predict.json"
    code, _, _ = mmf_run(capsys, CONFIG, tmp_path, "run_type=predict", f"checkpoint.resume_file={tmp_path}/save/current.ckpt",
                         f"evaluation.predict_file={submission}")
    assert code == 0
    predictions = json.loads(submission.read_text())
    assert len(predictions) == 300 and set(predictions[0]) == {"questionId", "prediction"}
    assert all(isinstance(p["questionId"], str) and len(p["questionId"]) == 8 for p in predictions)
