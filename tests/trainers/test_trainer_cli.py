"""``mmf_run`` drives the ``mmf`` trainer end to end (toy plugin loaded through env.user_dir)."""
from __future__ import annotations

import json
from pathlib import Path

from villa_plugin.checkpoint import load_checkpoint
from villa_plugin.cli import run

TOYS = Path(__file__).resolve().parent / "trainer_toys.py"


def _mmf_run(save_dir, *extra):
    return run([
        "model=test_toy_mlp", "datasets=test_numbers", f"env.user_dir={TOYS}", f"env.save_dir={save_dir}",
        "training.device=cpu", "training.tensorboard=false", "training.log_format=json", "training.log_interval=2", *extra,
    ])


def test_mmf_run_trains_evaluates_and_predicts(tmp_path, capsys):
    save_dir = tmp_path / "save"
    assert _mmf_run(save_dir, "run_type=train_val", "training.max_updates=6", "training.evaluation_interval=3", "evaluation.metrics=[accuracy]") == 0
    out = capsys.readouterr().out.splitlines()
    lines = [json.loads(line[line.index('{"update"'):]) for line in out if '{"update"' in line]
    assert [line["update"] for line in lines if "train/total_loss" in line] == [2, 4, 6]
    assert [line["update"] for line in lines if "val/test_numbers/accuracy" in line] == [3, 6, 6]  # periodic + final
    assert load_checkpoint(str(save_dir / "current.ckpt"))["counts"]["num_updates"] == 6

    predictions = tmp_path / "out" / "test_numbers.json"
    assert _mmf_run(save_dir, "run_type=predict", f"evaluation.predict_file={tmp_path}/out/{{dataset}}.json", f"checkpoint.resume_file={save_dir}/current.ckpt") == 0
    assert len(json.loads(predictions.read_text())) == 40


def test_mmf_run_reports_a_missing_resume_file_as_a_user_error(tmp_path, capsys):
    assert _mmf_run(tmp_path / "save", "run_type=train", "checkpoint.resume=true") == 1
    assert "current.ckpt" in capsys.readouterr().err


def test_villa_demo_under_the_plain_trainer_fails_naming_both_keys(tmp_path, capsys):
    demo = Path(__file__).resolve().parents[2] / "projects" / "villa" / "demo.yaml"
    assert run([f"config={demo}", "training.trainer=mmf", f"env.save_dir={tmp_path / 'save'}", "training.device=cpu"]) == 1
    err = capsys.readouterr().err
    assert "model_config.villa.adversarial.adv_training=true" in err and "training.trainer=mmf" in err
    assert "training.trainer=villa_free_at" in err
