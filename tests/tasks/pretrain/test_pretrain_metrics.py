"""Validation metrics: official definitions, accumulated over batches, additive sums."""
from __future__ import annotations

import pytest
import torch

from pretrain_testlib import itm_rows, mlm_rows, mrm_rows, raw_examples, tiny_model
from villa_plugin.tasks.pretrain.collate import itm_collate, mlm_collate, mrm_collate
from villa_plugin.tasks.pretrain.metrics import PretrainValidation


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def _two_batches(task):
    halves = [raw_examples(seed=1), raw_examples(seed=2)]
    if task == "mlm":
        return [mlm_collate(mlm_rows(h)) for h in halves]
    if task == "itm":
        return [itm_collate(itm_rows(h, t)) for h, t in zip(halves, [(1, 0, 1), (0, 0, 1)])]
    return [mrm_collate(mrm_rows(h), task) for h in halves]


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrckl", "mrc", "itm"])
def test_metrics_equal_the_official_definitions(model, task):
    meter, batches = PretrainValidation(), _two_batches(task)
    outputs = [model(b, compute_loss=False) for b in batches]
    with torch.no_grad():
        for b, o in zip(batches, outputs):
            meter.update(task, o, b)
    results = meter.results()
    scores = torch.cat([o["scores"] for o in outputs])
    if task == "mlm":
        labels = torch.cat([b["txt_labels"][b["txt_labels"] != -1] for b in batches])
        expected = {"mlm_loss": torch.nn.functional.cross_entropy(scores, labels).item(),
                    "mlm_accuracy": (scores.argmax(-1) == labels).float().mean().item()}
    elif task == "mrfr":
        targets = torch.cat([b["feat_targets"] for b in batches])
        expected = {"mrfr_loss": ((scores - targets) ** 2).mean().item()}  # per element, like training
    elif task in ("mrckl", "mrc"):
        soft = torch.cat([b["label_targets"] for b in batches])
        logq = torch.log_softmax(scores, -1)
        if task == "mrckl":
            kl = torch.where(soft > 0, soft * (soft.clamp_min(1e-30).log() - logq), torch.zeros_like(soft))
            expected = {"mrckl_kl": kl.sum(-1).mean().item(),  # per region: 1601x the training loss
                        "mrckl_accuracy": (scores.argmax(-1) == soft.argmax(-1)).float().mean().item()}
        else:
            hard = soft[:, 1:].argmax(-1) + 1
            expected = {"mrc_loss": torch.nn.functional.cross_entropy(scores, hard).item(),
                        "mrc_accuracy": (scores.argmax(-1) == hard).float().mean().item()}
    else:
        targets = torch.cat([b["targets"] for b in batches])
        d = torch.cat([o["ot_distance"] for o in outputs])
        n = len(targets)
        expected = {"itm_loss": torch.nn.functional.cross_entropy(scores, targets).item(),
                    "itm_accuracy": (scores.argmax(-1) == targets).float().mean().item(),
                    "itm_ot_loss": (d[targets == 1].sum() - d[targets == 0].sum()).item() / n,
                    "itm_ot_pos": d[targets == 1].sum().item() / n, "itm_ot_neg": d[targets == 0].sum().item() / n}
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_sums_are_additive_across_ranks(model):
    batches = _two_batches("mlm")
    whole, rank0, rank1 = PretrainValidation(), PretrainValidation(), PretrainValidation()
    with torch.no_grad():
        outputs = [model(b, compute_loss=False) for b in batches]
    for b, o in zip(batches, outputs):
        whole.update("mlm", o, b)
    rank0.update("mlm", outputs[0], batches[0])
    rank1.update("mlm", outputs[1], batches[1])
    merged = {"mlm": {k: rank0.sums()["mlm"][k] + rank1.sums()["mlm"][k] for k in rank0.sums()["mlm"]}}
    rank0.load_sums(merged)
    assert rank0.results() == pytest.approx(whole.results())
