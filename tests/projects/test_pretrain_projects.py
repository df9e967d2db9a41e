"""The pre-training project configs compose with the official hyper-parameters and the VILLA block."""
from __future__ import annotations

import pytest

from villa_plugin.config.compose import build_config

COMMON = {"training.trainer": "villa_free_at", "training.batching": "token_bucket", "training.precision": "fp16",
          "training.max_grad_l2_norm": 5.0, "multitasking.type": "mix_ratio", "distributed.find_unused_parameters": True, "optimizer.params.lr": 5e-5,
          "optimizer.params.betas": [0.9, 0.98], "optimizer.params.weight_decay": 0.01,
          "scheduler.params.warmup_steps": 10000, "model_config.uniter_pretrain.dropout": 0.1,
          "model_config.uniter_pretrain.itm_ot_lambda": 0.1,
          "model_config.uniter_pretrain.adversarial.adv_training": True,
          "model_config.uniter_pretrain.adversarial.adv_steps": 3,
          "model_config.uniter_pretrain.adversarial.adv_kl_weight": 1.5,
          "model_config.uniter_pretrain.adversarial.adv_tasks": ["mlm", "mrckl", "itm"]}
CASES = {
    "pretrain_indomain_base.yaml": ({"training.batch_size_tokens": 10240, "training.update_frequency": 2,
                                     "training.max_updates": 200000, "training.evaluation_interval": 5000,
                                     "model_config.uniter_pretrain.uniter_config": "base"},
                                    {"pretrain_coco": [2, 2, 1, 1], "pretrain_vg": [2, 2, 1, 1]}),
    "pretrain_indomain_large.yaml": ({"training.batch_size_tokens": 6144, "training.update_frequency": 4,
                                      "training.max_updates": 500000, "training.evaluation_interval": 10000,
                                      "model_config.uniter_pretrain.uniter_config": "large"},
                                     {"pretrain_coco": [2, 2, 1, 1], "pretrain_vg": [2, 2, 1, 1]}),
    "pretrain_all_base.yaml": ({"training.batch_size_tokens": 10240, "training.update_frequency": 6,
                                "training.max_updates": 200000, "model_config.uniter_pretrain.uniter_config": "base"},
                               {"pretrain_coco": [6, 8, 4, 4], "pretrain_vg": [9, 12, 6, 6],
                                "pretrain_cc": [9, 12, 6, 6], "pretrain_sbu": [6, 8, 4, 4]}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pretraining_project_composes_with_the_official_values(name, tmp_path):
    config = build_config([f"config=projects/villa/{name}", f"env.data_dir={tmp_path}"])
    expected, mixes = CASES[name]
    for key, value in {**COMMON, **expected}.items():
        got = config
        for part in key.split("."):
            got = got[part]
        got = list(got) if hasattr(got, "__len__") and not isinstance(got, str) else got
        assert got == value, key
    assert list(config.datasets) == list(mixes)
    for dataset, ratios in mixes.items():
        block = config.dataset_config[dataset]
        assert list(block.tasks) == ["itm", "mlm", "mrfr", "mrckl"] and list(block.mix_ratio) == ratios, dataset
        assert block.max_txt_len == 60 and block.itm_neg_prob == 0.5 and block.mrm_prob == 0.15
    init = "large" if "large" in name else "base"
    assert config.model_config.uniter_pretrain.pretrained_checkpoint.endswith(f"uniter-{init}-init.pt")
