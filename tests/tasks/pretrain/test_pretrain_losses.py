"""Every task's loss and every parameter gradient equal a per-example reference built from the spec."""
from __future__ import annotations

import pytest
import torch

from pretrain_testlib import (
    assert_grads_match,
    assert_rel_close,
    grads_of,
    itm_reference,
    itm_rows,
    mlm_reference,
    mlm_rows,
    mrc_reference,
    mrckl_reference,
    mrfr_reference,
    mrm_rows,
    raw_examples,
    tiny_model,
)
from villa_plugin.common.errors import DataError
from villa_plugin.tasks.pretrain.collate import itm_collate, mlm_collate, mrm_collate

RTOL = 1e-5


def _check(model, batch, reference_loss, task=None):
    output = model(batch, task=task)
    loss = sum(output["losses"].values())
    torch.testing.assert_close(loss, reference_loss.detach(), rtol=RTOL, atol=0)
    assert_grads_match(grads_of(model, loss), grads_of(model, reference_loss), rtol=RTOL)
    return output


def test_mlm_loss_and_gradients_equal_reference():
    model, rows = tiny_model(), mlm_rows(raw_examples())
    batch = mlm_collate(rows)
    output = _check(model, batch, mlm_reference(model, rows))
    n_masked = sum(label != -1 for row in rows for label in row["txt_labels"])
    assert output["scores"].shape == (n_masked, 100)


def test_mlm_tied_gradient_is_lookup_plus_decoder():
    """The shared word-embedding gradient = lookup part + decoder part; the decoder reaches padding row 0."""
    model, rows = tiny_model(), mlm_rows(raw_examples())
    loss = sum(model(mlm_collate(rows))["losses"].values())
    shared = grads_of(model, loss)["uniter.embeddings.word_embeddings.weight"]
    decoder_copy = model.uniter.embeddings.word_embeddings.weight.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    mlm_reference(model, rows, decoder_weight=decoder_copy).backward()
    lookup = model.uniter.embeddings.word_embeddings.weight.grad
    assert_rel_close(shared, lookup + decoder_copy.grad, RTOL, "word embeddings")
    assert lookup[0].abs().max() == 0 and shared[0].abs().max() > 0


def test_mrfr_loss_and_gradients_equal_reference():
    model, rows = tiny_model(), mrm_rows(raw_examples())
    _check(model, mrm_collate(rows, "mrfr"), mrfr_reference(model, rows))
    mask_grad = model.uniter.img_embeddings.mask_embedding.weight.grad
    assert mask_grad is None or mask_grad[0].abs().max() == 0


def test_mrfr_tied_gradient_is_projection_plus_regression():
    model, rows = tiny_model(), mrm_rows(raw_examples())
    shared = grads_of(model, sum(model(mrm_collate(rows, "mrfr"))["losses"].values()))
    key = "uniter.img_embeddings.img_linear.weight"
    copy = model.uniter.img_embeddings.img_linear.weight.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    mrfr_reference(model, rows, regress_weight=copy).backward()
    assert_rel_close(shared[key], model.uniter.img_embeddings.img_linear.weight.grad + copy.grad, RTOL, key)


@pytest.mark.parametrize("task, reference", [("mrckl", mrckl_reference), ("mrc", mrc_reference)])
def test_mrc_losses_and_gradients_equal_reference(task, reference):
    model, rows = tiny_model(), mrm_rows(raw_examples())
    output = _check(model, mrm_collate(rows, task), reference(model, rows))
    assert output["scores"].shape[-1] == 1601


def test_mrckl_is_divided_by_1601_not_batchmean():
    model, rows = tiny_model(), mrm_rows(raw_examples())
    output = model(mrm_collate(rows, "mrckl"))
    batch = mrm_collate(rows, "mrckl")
    logq = torch.log_softmax(output["scores"], -1)
    p = batch["label_targets"]
    per_region = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), torch.zeros_like(p)).sum(-1)
    torch.testing.assert_close(output["losses"]["mrckl"], per_region.mean() / 1601, rtol=RTOL, atol=0)


@pytest.mark.parametrize("targets", [(1, 0, 1), (0, 0, 1), (1, 1, 1)])
def test_itm_with_wra_loss_and_gradients_equal_reference(targets):
    model, rows = tiny_model(), itm_rows(raw_examples(), targets)
    output = _check(model, itm_collate(rows, with_ot=True), itm_reference(model, rows, ot_lambda=0.1))
    assert set(output["losses"]) == {"itm", "itm_ot"} and output["ot_distance"].shape == (3,)


def test_itm_without_wra():
    model, rows = tiny_model(itm_ot_lambda=0.0), itm_rows(raw_examples(), (1, 0, 0))
    output = _check(model, itm_collate(rows, with_ot=False), itm_reference(model, rows, ot_lambda=0.0))
    assert set(output["losses"]) == {"itm"}


def test_mask_embedding_row0_zeroed_in_place_and_masked_input_is_row1():
    model, rows = tiny_model(), mrm_rows(raw_examples())
    weight = model.uniter.img_embeddings.mask_embedding.weight
    assert weight[0].abs().max() > 0  # init overwrites the padding row, as the reference
    model(mrm_collate(rows, "mrfr"))
    assert weight[0].abs().max() == 0
    # MLM / ITM never pass img_masks: no gradient for mask_embedding
    grads = grads_of(model, sum(model(mlm_collate(mlm_rows(raw_examples())))["losses"].values()))
    assert grads["uniter.img_embeddings.mask_embedding.weight"].abs().max() == 0


def test_missing_soft_labels_and_task_keys_are_errors_naming_the_key():
    model, rows = tiny_model(), mrm_rows(raw_examples())
    batch = mrm_collate(rows, "mrfr")
    with pytest.raises(DataError, match="label_targets"):
        model(batch, task="mrckl")
    with pytest.raises(DataError, match="txt_labels"):
        model(batch, task="mlm")
    with pytest.raises(DataError, match="task"):
        model({k: v for k, v in batch.items() if k != "task"})
    with pytest.raises(DataError, match="Unknown pre-training task"):
        model(batch, task="nsp")


def test_wra_on_without_ot_inputs_is_an_error():
    model, rows = tiny_model(itm_ot_lambda=0.1), itm_rows(raw_examples(), (1, 0, 1))
    with pytest.raises(DataError, match="ot_inputs"):
        model(itm_collate(rows, with_ot=False))


def test_scores_only_mode_needs_no_targets():
    model, rows = tiny_model(), mrm_rows(raw_examples())
    batch = mrm_collate(rows, "mrckl")
    del batch["label_targets"]
    output = model(batch, compute_loss=False)
    assert "losses" not in output and output["scores"].shape == (int(batch["img_masks"].sum()), 1601)
