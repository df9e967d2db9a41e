"""projects/villa/lxmert_{vqa,gqa,nlvr2}.yaml compose and carry the official LXMERT-AdvTrain settings
(shared/reference/lxmert.md §7, §9.3)."""
import pytest
import torch

from villa_plugin.backbones.lxmert.optimization import BertAdam
from villa_plugin.config.compose import build_config
from villa_plugin.optim import build_optimizer, build_scheduler

OFFICIAL = {  # project: (dataset, head, num_labels, lr, text δ step, train examples)
    "lxmert_vqa": ("vqa2", "lxmert_vqa", 3129, 5e-5, 1e-3, 632117),  # train + nominival
    "lxmert_gqa": ("gqa", "lxmert_gqa", 1842, 1e-5, 1e-2, 943000 + 132062),
    "lxmert_nlvr2": ("nlvr2", "lxmert_nlvr2", 2, 5e-5, 1e-3, 86373),
}


@pytest.mark.parametrize("project", sorted(OFFICIAL))
def test_lxmert_project_has_the_official_settings(project):
    dataset, head, labels, lr, txt_step, examples = OFFICIAL[project]
    config = build_config([f"config=projects/villa/{project}.yaml"], load_plugins=False)
    model = config.model_config.lxmert
    assert config.model == "lxmert" and list(config.datasets) == [dataset]
    assert (model.head, model.num_labels) == (head, labels)
    assert model.pretrained_checkpoint.endswith("lxmert/model_LXRT.pth")
    assert bool(model.answer_surgery.task_answers) == (dataset != "nlvr2")  # --loadLXMERTQA vs --loadLXMERT
    adv = model.adversarial
    assert adv.adv_training and list(adv.adv_modality) == ["text"] and adv.adv_steps == 3
    assert adv.adv_lr_txt == txt_step and adv.adv_kl_weight == 1.5 and adv.adv_max_norm == 0.0
    training = config.training
    assert training.batch_size == 32 and training.precision == "fp32" and training.seed == 9595
    assert training.clip_gradients and training.max_grad_l2_norm == 5.0
    assert training.max_updates == 4 * (examples // 32)  # 4 epochs, drop_last
    assert config.scheduler.type == "bert_warmup_linear"
    assert config.scheduler.params.warmup_steps == round(0.1 * training.max_updates)
    assert config.optimizer.type == "bert_adam" and list(config.optimizer.no_decay) == []
    params = config.optimizer.params
    assert params.lr == lr and list(params.betas) == [0.9, 0.999] and params.weight_decay == 0.01

    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.ones(1))], "weight_decay": 0.01}],
                                config.optimizer)
    assert isinstance(optimizer, BertAdam) and optimizer.defaults["b2"] == 0.999
    assert build_scheduler(optimizer, config).current_lr == 1e-8  # lr 0 on the first update, floored


def test_lxmert_vqa_reads_lxmert_records_train_plus_nominival_validated_on_minival():
    vqa2 = build_config(["config=projects/villa/lxmert_vqa.yaml"], load_plugins=False).dataset_config.vqa2
    assert vqa2.source == "lxmert_json" and vqa2.img_key_format == "{img_id}"
    assert list(vqa2.lxmert_json.train) == ["vqa/train.json", "vqa/nominival.json"]
    assert list(vqa2.lxmert_json.val) == ["vqa/minival.json"]
