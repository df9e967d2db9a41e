"""Registered model ``lxmert``: YAML defaults, heads from the registry, UNITER-style task batches
(vqa2 and nlvr2 demos), every trainable parameter's gradient, checkpoint loading from the config,
and the registered ``bert_adam`` / ``bert_warmup_linear``."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from models_testlib import model_and_batch
from villa_plugin.adversarial.config import AdversarialConfig
from villa_plugin.adversarial.protocol import check_perturbable
from villa_plugin.backbones.lxmert.optimization import BertAdam, warmup_linear
from villa_plugin.backbones.lxmert.task_model import LxmertForTask
from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.optim import build_optimizer, build_scheduler
from villa_plugin.registry import registry

TINY = ["model_config.lxmert.architecture.hidden_size=32", "model_config.lxmert.architecture.num_attention_heads=4",
        "model_config.lxmert.architecture.intermediate_size=64", "model_config.lxmert.architecture.l_layers=1",
        "model_config.lxmert.architecture.r_layers=1", "model_config.lxmert.architecture.x_layers=2",
        "model_config.lxmert.architecture.vocab_size=512"]


def _model_and_batch(argv, tmp_path):
    torch.manual_seed(0)
    return model_and_batch([*argv, f"env.cache_dir={tmp_path}"])


def _assert_every_trainable_parameter_gets_a_gradient(model, batch):
    model.train()
    output = model(batch)
    sum(output["losses"].values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == 16 and all(n.startswith("lxmert.encoder.x_layers.1.visn_") for n in frozen)  # dead half
    return output


def test_registered_name_and_yaml_defaults():
    assert registry.get_model_class("lxmert") is LxmertForTask
    defaults = OmegaConf.to_container(OmegaConf.load(LxmertForTask.config_path()))["model_config"]["lxmert"]
    assert defaults["head"] == "lxmert_vqa" and defaults["num_labels"] == 3129 and defaults["losses"] is None
    assert defaults["pretrained_checkpoint"] == "" and defaults["adversarial"]["adv_training"] is False
    adv = AdversarialConfig.from_dict(defaults["adversarial"])
    assert adv.adv_modality == ("text",) and adv.adv_steps == 3 and adv.adv_kl_weight == 1.5


def test_lxmert_trains_on_the_vqa2_builders_batches(tmp_path):
    model, batch = _model_and_batch(["config=projects/villa/demo_lxmert.yaml"], tmp_path)
    assert batch["img_pos_feat"].size(-1) == 7  # UNITER's box layout, read as its first 4 columns
    assert check_perturbable(model) == "mean_times_classes"
    output = _assert_every_trainable_parameter_gets_a_gradient(model, batch)
    assert output["scores"].shape == (4, 20) and list(output["losses"]) == ["train/vqa2/logit_bce"]


def test_lxmert_trains_on_the_nlvr2_builders_paired_batches(tmp_path):
    argv = ["config=projects/villa/demo_nlvr2.yaml", "model=lxmert", "model_config.lxmert.head=lxmert_nlvr2",
            "model_config.lxmert.num_labels=2", *TINY]
    model, batch = _model_and_batch(argv, tmp_path)
    assert batch["input_ids"].size(0) == 8  # two rows (left, right image) per example
    assert check_perturbable(model) == "mean"
    output = _assert_every_trainable_parameter_gets_a_gradient(model, batch)
    assert output["scores"].shape == (4, 2) and list(output["losses"]) == ["train/nlvr2/cross_entropy"]


def _tiny_config(**extra):
    arch = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "l_layers": 1, "r_layers": 1,
            "x_layers": 1, "vocab_size": 50, "visual_feat_dim": 8}
    return {"architecture": arch, "head": "lxmert_vqa", "num_labels": 3, **extra}


def _build(config):
    model = LxmertForTask(config)
    model.build()
    return model


def test_pretrained_checkpoint_is_loaded_with_a_report(tmp_path):
    torch.manual_seed(0)
    source = _build(_tiny_config())
    path = tmp_path / "lxmert.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(1)
    model = _build(_tiny_config(pretrained_checkpoint=str(path)))
    assert model.load_report.missing == [] and len(model.load_report.loaded) == len(source.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())
    assert _build(_tiny_config()).load_report is None

    with pytest.raises(CheckpointError, match="pretrained_checkpoint.*file not found"):
        _build(_tiny_config(pretrained_checkpoint=str(tmp_path / "missing.pth")))
    with pytest.raises(ConfigError, match="answer_surgery needs both"):
        _build(_tiny_config(pretrained_checkpoint=str(path), answer_surgery={"task_answers": str(path)}))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["yes", "no", "2"]))
    with pytest.raises(CheckpointError, match="answer_surgery is set but .* has no pre-training QA head"):
        _build(_tiny_config(pretrained_checkpoint=str(path),
                            answer_surgery={"task_answers": str(answers), "pretrain_answers": str(answers)}))
    with pytest.raises(ConfigError, match="pretrained_checkpoint is empty"):
        _build(_tiny_config(answer_surgery={"task_answers": "a.json", "pretrain_answers": "b.json"}))


def test_answer_surgery_copies_the_pretrained_qa_head_by_answer(tmp_path):
    torch.manual_seed(0)
    trunk = _build(_tiny_config()).state_dict()
    state = {"module.bert." + k[len("lxmert."):]: v for k, v in trunk.items() if k.startswith("lxmert.")}
    state["module.cls.seq_relationship.weight"] = torch.zeros(2, 32)  # makes it a pre-trained file
    head = {"0.weight": torch.randn(64, 32), "0.bias": torch.randn(64), "2.weight": torch.randn(64),
            "2.bias": torch.randn(64), "3.weight": torch.randn(4, 64), "3.bias": torch.randn(4)}
    state.update({f"module.answer_head.logit_fc.{k}": v for k, v in head.items()})
    path = tmp_path / "model_LXRT.pth"
    torch.save(state, path)
    (tmp_path / "all_ans.json").write_text(json.dumps([{"ans": a} for a in ["yes", "no", "2", "red"]]))
    (tmp_path / "ans2label.json").write_text(json.dumps({"red": 0, "two": 1, "purple": 2}))
    model = _build(_tiny_config(pretrained_checkpoint=str(path), answer_surgery={
        "task_answers": str(tmp_path / "ans2label.json"), "pretrain_answers": str(tmp_path / "all_ans.json")}))
    weight = model.logit_fc[3].weight
    assert torch.equal(weight[0], head["3.weight"][3]) and torch.equal(weight[1], head["3.weight"][2])  # "two" -> "2"
    assert torch.equal(weight[2], torch.zeros(64))  # unknown answer: zero row
    assert model.load_report.missing == []


def test_bert_adam_and_its_schedule_are_registered():
    param = torch.nn.Parameter(torch.ones(3))
    config = {"optimizer": {"type": "bert_adam", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-6,
                                                             "weight_decay": 0.01}},
              "scheduler": {"type": "bert_warmup_linear", "params": {"warmup_steps": 10, "num_training_steps": 100}}}
    optimizer = build_optimizer([{"params": [param], "weight_decay": 0.01}], config["optimizer"])
    assert isinstance(optimizer, BertAdam) and optimizer.param_groups[0]["t_total"] == -1
    schedule = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(100):
        lrs.append(schedule.current_lr)
        schedule.step()
    official = [1e-3 * warmup_linear(step / 100, 0.1) for step in range(100)]  # the reference counts from 0
    assert lrs[0] == 1e-8 and official[0] == 0.0  # the plugin's floor for a zero lr
    assert lrs[1:] == pytest.approx(official[1:], rel=1e-12)
