"""Retrieval head ``itm``: official keys, rank_output init from itm_output row 1, hard-negative mining
(eval mode, no gradient, cached), row packing without UNITER's gather bug, the triplet loss, the
adversarial KL over candidate rows, and the IR/TR recall metric."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uniter_testlib import tiny_model_config
from villa_plugin.adversarial.engine import FreeATEngine
from villa_plugin.adversarial.losses import reduce_kl, symmetric_kl
from villa_plugin.common.sample_list import SampleList
from villa_plugin.tasks.retrieval.dataset import RetrievalCorpus, RetrievalTrainDataset
from villa_plugin.datasets.collate import collate_rows
from villa_plugin.datasets.task_common import make_row
from villa_plugin.tasks.retrieval.metrics import RetrievalRecall, retrieval_recalls
from villa_plugin.backbones.uniter.checkpoint_keys import load_uniter_checkpoint
from villa_plugin.tasks.retrieval.head import ItmTripletLoss, score_bank_pairs, select_hard
from villa_plugin.models.registered import UNITER, UniterEncoder
from villa_plugin.optim import build_param_groups

H = 32


def build(dropout=0.1, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_model_config(head="itm", num_labels=1, dropout=dropout, losses=[{"type": "itm_triplet"}])
    cfg.update(overrides)
    model = UNITER(cfg)
    model.build()
    model.init_losses()
    return model


class FakeImgDb(dict):
    """``db[key] -> (feat, pos)`` like ImgFeatDB, in memory."""

    def nbb(self, key):
        return int(self[key][0].size(0))


def corpus(n_images=6, texts_per_image=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    db = FakeImgDb()
    for j in range(n_images):
        n = 2 + j % 3
        pos = torch.rand(n, 7, generator=gen)
        db[f"img{j}"] = (torch.rand(n, 2048, generator=gen), pos)
    n_texts = n_images * texts_per_image
    ids = [torch.randint(5, 100, (2 + t % 5,), generator=gen).tolist() for t in range(n_texts)]
    return RetrievalCorpus(
        text_ids=[f"t{t}" for t in range(n_texts)], text_img=[t // texts_per_image for t in range(n_texts)],
        text_lens=[len(x) for x in ids], image_ids=[f"img{j}" for j in range(n_images)],
        image_keys=[f"img{j}" for j in range(n_images)], image_db=[0] * n_images, img_dbs=[db], cls_id=1,
        sep_id=2, input_ids=ids,
    )


def query_batch(negative_size=4, hard_neg_size=2, seed=0, examples=(0, 3, 5)):
    torch.manual_seed(seed)
    ds = RetrievalTrainDataset("retrieval", "train", {}, corpus(), negative_size=negative_size, hard_neg_size=hard_neg_size)
    return ds.collate([ds[i] for i in examples])


def test_head_has_the_official_top_level_keys_and_a_frozen_itm_output():
    model = build()
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("uniter.")}
    assert keys == {"itm_output.weight": (2, H), "itm_output.bias": (2,), "rank_output.weight": (1, H), "rank_output.bias": (1,)}
    assert not model.itm_output.weight.requires_grad and model.rank_output.weight.requires_grad
    grouped = {id(p) for g in build_param_groups(model, {"params": {"lr": 1e-4}}) for p in g["params"]}
    assert id(model.itm_output.weight) not in grouped and id(model.rank_output.weight) in grouped
    assert model.kl_reduction == "sum_classes_mean"


def test_rank_output_is_initialised_from_itm_output_row_1_when_the_checkpoint_lacks_it(tmp_path):
    donor = build(seed=3)
    itm_w, itm_b = torch.randn(2, H), torch.randn(2)
    state = {k: v for k, v in donor.state_dict().items() if k.startswith("uniter.")}
    state.update({"itm_output.weight": itm_w, "itm_output.bias": itm_b})
    path = tmp_path / "uniter-tiny.pt"
    torch.save({"bert." + k[len("uniter."):]: v for k, v in state.items() if k.startswith("uniter.")}
               | {"itm_output.weight": itm_w, "itm_output.bias": itm_b}, path)
    model = build(pretrained_checkpoint=str(path))  # the pretrained-file path of build()
    assert torch.equal(model.itm_output.weight, itm_w)
    assert torch.equal(model.rank_output.weight, itm_w[1:2]) and torch.equal(model.rank_output.bias, itm_b[1:2])
    # a file that has rank_output keeps it
    rank_w, rank_b = torch.randn(1, H), torch.randn(1)
    other = build(seed=1)
    load_uniter_checkpoint(other, dict(state, **{"rank_output.weight": rank_w, "rank_output.bias": rank_b}))
    assert torch.equal(other.rank_output.weight, rank_w) and torch.equal(other.rank_output.bias, rank_b)
    # a file without itm_output leaves rank_output alone
    third = build(seed=2)
    before = third.rank_output.weight.clone()
    load_uniter_checkpoint(third, {k: v for k, v in state.items() if k.startswith("uniter.")})
    assert torch.equal(third.rank_output.weight, before)


def test_select_hard_picks_the_highest_scoring_negatives():
    scores = torch.tensor([[0.1, 0.9, -1.0, 0.5, 0.3], [2.0, -2.0, 1.0, 3.0, 0.0]])
    assert select_hard(scores, 2).tolist() == [[1, 3], [3, 0]]
    assert select_hard(scores, 1).tolist() == [[1], [3]]


def test_query_batch_layout():
    batch = query_batch()
    q = 6  # 3 text queries, then 3 image queries
    assert batch["input_ids"].size(0) == q and batch["query_dir"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["neg_txt"].shape == (q, 4) and batch["neg_img"].shape == (q, 4)
    assert batch["targets"].tolist() == [0] * q and batch["hard_neg_size"] == 2
    c = corpus()
    bank_txt = [tuple(r[1 : int(n) - 1]) for r, n in zip(batch["txt_bank_ids"].tolist(), batch["txt_bank_lens"])]
    text_of = {tuple(c.input_ids[t]): t for t in range(c.n_texts)}
    bank_img = [next(j for j in range(c.n_images) if torch.equal(batch["img_bank_feat"][b, : int(n)], c.image(j)[0]))
                for b, n in enumerate(batch["img_bank_nbb"])]
    for row in range(q):
        t_pos, j_pos = text_of[bank_txt[batch["pos_txt"][row]]], bank_img[batch["pos_img"][row]]
        assert c.text_img[t_pos] == j_pos  # the positive pair matches
        for k in range(4):
            t, j = text_of[bank_txt[batch["neg_txt"][row, k]]], bank_img[batch["neg_img"][row, k]]
            assert c.text_img[t] != j  # no negative is a true match
            assert (t == t_pos) if row < 3 else (j == j_pos)  # text queries keep their text, image queries their image


def test_mining_scores_in_eval_mode_without_gradient_caches_and_restores_train_mode():
    model = build(dropout=0.3)
    batch = query_batch()
    model.train()
    scores = model(batch)["scores"]
    assert scores.shape == (6, 3) and model.training and model.uniter.training
    head = model.head
    assert head.mining_passes == 1
    hard_txt, hard_img = head._cache[1], head._cache[2]
    model.eval()
    with torch.no_grad():
        all_scores = score_bank_pairs(UniterEncoder(model.uniter), model.rank_output, batch, batch["neg_txt"].reshape(-1),
                                      batch["neg_img"].reshape(-1)).view(6, 4)
    model.train()
    top = all_scores.topk(2, dim=1).indices
    assert torch.equal(hard_txt, batch["neg_txt"].gather(1, top)) and torch.equal(hard_img, batch["neg_img"].gather(1, top))
    for _ in range(3):  # VILLA's 1 + K forwards of a micro-batch reuse the mined negatives
        model(batch, perturbation={"text": torch.zeros(model.perturbation_shapes(batch)["text"])})
    assert head.mining_passes == 1
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(batch)["losses"]["train/retrieval/itm_triplet"].backward()
    opt.step()  # new parameters: the negatives are mined again
    model(batch)
    assert head.mining_passes == 2
    assert not any(p.grad is not None for p in model.itm_output.parameters())


def test_candidate_rows_are_packed_with_their_own_lengths_no_gather_bug():
    model = build(dropout=0.0)
    model.eval()
    batch = query_batch()
    txt_idx = torch.tensor([0, 1, 2, 3, 1, 0])
    img_idx = torch.tensor([0, 0, 1, 2, 3, 1])
    assert len(set(batch["txt_bank_lens"][txt_idx].tolist())) > 1  # texts of different lengths share the batch
    with torch.no_grad():
        packed = score_bank_pairs(UniterEncoder(model.uniter), model.rank_output, batch, txt_idx, img_idx, chunk_size=4)
        rows = []
        for t, j in zip(txt_idx.tolist(), img_idx.tolist()):
            n_txt, n_img = int(batch["txt_bank_lens"][t]), int(batch["img_bank_nbb"][j])
            ids = batch["txt_bank_ids"][t, 1 : n_txt - 1].tolist()
            rows.append(make_row(1, 2, [ids], batch["img_bank_feat"][j, :n_img], batch["img_bank_pos"][j, :n_img]))
        alone = torch.stack([model(SampleList(collate_rows([r])))["scores"].reshape(()) for r in rows])
    assert torch.allclose(packed, alone, atol=1e-5)


def test_triplet_loss_on_hand_numbers():
    s = torch.sigmoid
    scores = torch.tensor([[2.0, 1.0, 3.0], [0.0, -1.0, 0.5], [1.0, 0.0, 0.0]])
    batch = SampleList(query_dir=torch.tensor([0, 1, 1]))
    h0 = (max(0, 0.2 + s(torch.tensor(1.0)) - s(torch.tensor(2.0))) + max(0, 0.2 + s(torch.tensor(3.0)) - s(torch.tensor(2.0)))) / 2
    h1 = (max(0, 0.2 + s(torch.tensor(-1.0)) - 0.5) + max(0, 0.2 + s(torch.tensor(0.5)) - 0.5)) / 2
    h2 = max(0, 0.2 + 0.5 - s(torch.tensor(1.0)))
    loss = ItmTripletLoss(margin=0.2)(batch, {"scores": scores})
    assert math.isclose(float(loss), float(h0 + (h1 + h2) / 2), rel_tol=1e-6)  # UNITER: sum over directions
    mean = ItmTripletLoss(margin=0.2, reduction="mean")(batch, {"scores": scores})
    assert math.isclose(float(mean), float(h0 + h1 + h2) / 3, rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"\[queries, 1 \+ negatives\]"):
        ItmTripletLoss()(batch, {"scores": torch.zeros(3, 1)})


def test_adversarial_kl_over_candidate_rows_is_exactly_zero_at_delta_zero():
    model = build(dropout=0.0)
    batch = query_batch()
    clean = model(batch)["scores"]
    shapes = model.perturbation_shapes(batch)
    assert shapes["text"][0] == 6  # the positive pairs are perturbed
    same = model(batch, perturbation={"text": torch.zeros(shapes["text"]), "image": torch.zeros(shapes["image"])})["scores"]
    kl = reduce_kl(symmetric_kl(same, clean), model.kl_reduction).detach()
    assert same.shape == (6, 3) and float(kl) == 0.0
    engine = FreeATEngine({"adv_training": True, "adv_modality": ["text"], "adv_steps": 1, "adv_lr_txt": 1e-3})
    stats = engine.step(model, batch, backward=lambda loss, retain_graph=False: loss.backward(), kl_reduction=model.kl_reduction)
    assert float(stats["kl"]) == 0.0
    model.zero_grad()
    engine = FreeATEngine({"adv_training": True, "adv_modality": ["image", "text"], "adv_steps": 3, "adv_lr_txt": 0.5,
                           "adv_lr_img": 5.0})
    stats = engine.step(model, batch, backward=lambda loss, retain_graph=False: loss.backward(), kl_reduction=model.kl_reduction)
    assert float(stats["kl"]) > 0 and math.isfinite(float(stats["loss"]))
    assert model.rank_output.weight.grad is not None


def test_pair_batches_get_one_score_per_pair():
    model = build()
    c = corpus()
    rows = [make_row(1, 2, [c.input_ids[t]], *c.image(j)) for t, j in ((0, 0), (1, 3), (5, 2))]
    out = model(SampleList(collate_rows(rows)))
    assert out["scores"].shape == (3, 1) and "losses" not in out


def test_retrieval_recalls_on_a_hand_matrix():
    # 4 texts x 3 images; texts 0, 1 -> image 0, text 2 -> image 1, text 3 -> image 2
    scores = torch.tensor([
        [0.9, 0.1, 0.0],   # gt image 0 ranked 1st
        [0.2, 0.8, 0.3],   # gt image 0 ranked 3rd
        [0.5, 0.4, 0.1],   # gt image 1 ranked 2nd
        [0.0, 0.1, 0.7],   # gt image 2 ranked 1st
    ])
    gt = torch.tensor([0, 0, 1, 2])
    r = retrieval_recalls(scores, gt, ks=(1, 2))
    assert r["ir_r1"] == 0.5 and r["ir_r2"] == 0.75
    # image 0: best gt text is text 0 (0.9), nothing higher -> rank 0; image 1: gt text 2 (0.4), texts 1 (0.8)
    # above -> rank 1; image 2: text 3 (0.7) -> rank 0
    assert math.isclose(r["tr_r1"], 2 / 3) and r["tr_r2"] == 1.0
    assert math.isclose(r["r_mean"], (r["ir_mean"] + r["tr_mean"]) / 2)
    assert math.isclose(r["ir_mean"], (0.5 + 0.75) / 2)


def _pair_batch(t, j, n_texts=4, n_images=3, gt=(0, 0, 1, 2)):
    t, j = torch.as_tensor(t), torch.as_tensor(j)
    return SampleList(txt_index=t, img_index=j, txt_gt_img=torch.as_tensor(gt)[t], n_texts=n_texts, n_images=n_images)


def test_retrieval_recall_metric_accumulates_batches_and_sums_over_ranks():
    scores = torch.rand(4, 3)
    pairs = [(t, j) for j in range(3) for t in range(4)]
    halves = [pairs[0::2], pairs[1::2]]  # two "ranks", each scoring every other pair
    metrics = []
    for half in halves:
        m = RetrievalRecall(report="ir_r1")
        for start in range(0, len(half), 5):
            chunk = half[start : start + 5]
            t, j = zip(*chunk)
            m.update(_pair_batch(t, j), {"scores": scores[list(t), list(j)].unsqueeze(1)})
        metrics.append(m)
    incomplete = RetrievalRecall()
    incomplete.scores, incomplete.gt_sum, incomplete.gt_count, incomplete.scored = (
        metrics[0].scores.clone(), metrics[0].gt_sum.clone(), metrics[0].gt_count.clone(), metrics[0].scored.clone())
    with pytest.raises(ValueError, match="pairs were scored"):
        incomplete.compute()
    other = metrics[1]
    packed_other = torch.cat([other.gt_sum, other.gt_count, other.scored.reshape(1)])
    first = metrics[0]
    # a stand-in all_reduce_sum: adds rank 1's tensor (the score matrix, then the packed gt/count vector)
    first.reduce(lambda x: x + (other.scores if x.shape == other.scores.shape else packed_other))
    expected = retrieval_recalls(scores, torch.tensor([0, 0, 1, 2]))
    assert first.compute() == expected["ir_r1"] and first.values == expected


def test_retrieval_recall_ignores_training_batches_and_checks_report_names():
    m = RetrievalRecall()
    m.update(SampleList(input_ids=torch.zeros(2, 3)), {"scores": torch.zeros(2, 3)})
    assert m.compute() == 0.0
    from villa_plugin.common.errors import ConfigError

    with pytest.raises(ConfigError, match="report"):
        RetrievalRecall(report="r@1")
    assert np.isclose(retrieval_recalls(torch.eye(3), torch.arange(3))["r_mean"], 1.0)
