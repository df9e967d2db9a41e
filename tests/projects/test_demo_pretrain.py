"""The bundled pre-training demo learns through ``mmf_run`` (VILLA stage 1, all four tasks mixed):
MLM and ITM validation accuracy far above their chance levels, which are logged beside them."""
from __future__ import annotations

import torch

from demo_task_runner import final_metrics, mmf_run, one_torch_thread  # noqa: F401  (autouse fixture)
from models_testlib import model_and_batch


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


def test_demo_pretrain_checkpoint_fine_tunes_the_vqa_demo(tmp_path, capsys):
    """Stage 1 -> stage 2: the demo pre-training checkpoint is a valid ``pretrained_checkpoint`` of
    ``demo.yaml`` unchanged: every trunk weight is loaded (only the new VQA head is missing, the
    pre-training heads are unused), and the fine-tune runs."""
    pretrain = tmp_path / "pretrain"
    code, _, _ = mmf_run(capsys, "projects/villa/demo_pretrain.yaml", pretrain, "training.max_updates=4",
                         "training.evaluation_interval=0", "training.checkpoint_interval=4")
    assert code == 0
    ckpt = pretrain / "save" / "current.ckpt"
    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]

    model, _ = model_and_batch(["config=projects/villa/demo.yaml", f"env.cache_dir={tmp_path}/cache",
                                f"model_config.villa.pretrained_checkpoint={ckpt}"])
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("uniter.")}
    assert model.load_report.missing and all(k.startswith("vqa_output.") for k in model.load_report.missing)
    assert all(torch.equal(trunk[k], trained[k].to(trunk[k].dtype)) for k in trunk if k in trained)
    assert sum(k in trained for k in trunk) == len(trunk)

    code, records, _ = mmf_run(capsys, "projects/villa/demo.yaml", tmp_path / "finetune", "training.max_updates=4",
                               "training.evaluation_interval=0", f"model_config.villa.pretrained_checkpoint={ckpt}")
    assert code == 0 and records and records[-1]["update"] == 4
