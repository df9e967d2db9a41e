"""The bundled pre-training demo learns through ``mmf_run`` (VILLA stage 1, all four tasks mixed):
MLM and ITM validation accuracy far above their chance levels, which are logged beside them."""
from __future__ import annotations

from demo_task_runner import final_metrics, mmf_run, one_torch_thread  # noqa: F401  (autouse fixture)


def test_demo_pretrain_learns(tmp_path, capsys):
    code, records, seconds = mmf_run(capsys, "projects/villa/demo_pretrain.yaml", tmp_path, "training.evaluation_interval=0")
    assert code == 0
    metrics = final_metrics(records, "val/pretrain_coco/")
    with capsys.disabled():
        print(f"\ndemo_pretrain: {metrics} in {seconds:.1f}s")
    mlm, itm = metrics["val/pretrain_coco/mlm_accuracy"], metrics["val/pretrain_coco/itm_accuracy"]
    # measured 0.83 / 0.78 against chance 0.29 / 0.52 (the majority baselines of the masked tokens / pairs)
    assert metrics["val/pretrain_coco/mlm_chance"] < 0.4 and mlm >= 0.7
    assert 0.4 < metrics["val/pretrain_coco/itm_chance"] < 0.6 and itm >= 0.7
    assert metrics["val/pretrain_coco/mrckl_kl"] > 0 and metrics["val/pretrain_coco/mrfr_loss"] > 0
    assert any("train/adv/mlm/kl" in r for r in records) and any("train/adv/itm/kl" in r for r in records)
    assert (tmp_path / "save" / "current.ckpt").is_file()
