"""Tiny pre-training models, seeded rows, and a per-example reference written from uniter-pretraining.md.

The reference runs the trunk on each example **alone and unpadded** (no gather index, no padding)
and applies every head with explicit formulas (manual GELU / LayerNorm / softmax / KL / IPOT), so
it checks packing, gathering, ties and normalisations independently of the code under test.
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Sequence, Tuple

import torch

from villa_plugin.backbones.uniter.model import UniterConfig
from villa_plugin.tasks.pretrain.masking import TextSpecials, mlm_text, plain_text, region_mask
from villa_plugin.tasks.pretrain.model import UniterForPretraining

TINY_ARCH = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SPECIALS = TextSpecials(cls=1, sep=2, mask=3, v_range=(5, 100))
LABEL_DIM = 1601
IMG_DIM = 2048
# (caption wordpieces, regions) per example: different lengths so packing and padding matter
LAYOUT = ((4, 3), (7, 5), (2, 6))


def tiny_model(seed: int = 0, **kwargs) -> UniterForPretraining:
    torch.manual_seed(seed)
    return UniterForPretraining(UniterConfig(**TINY_ARCH), **kwargs)


def raw_examples(layout: Sequence[Tuple[int, int]] = LAYOUT, seed: int = 0) -> List[Dict]:
    """Captions (ids without specials), region features, boxes and soft labels (with exact zeros)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i, (n_tok, nbb) in enumerate(layout):
        soft = torch.softmax(3 * torch.randn(nbb, LABEL_DIM, generator=gen), dim=-1)
        soft[:, 1::7] = 0.0  # 0·log 0 terms
        examples.append({
            "id": f"ex{i}",
            "tokens": torch.randint(5, 100, (n_tok,), generator=gen).tolist(),
            "img_feat": torch.rand(nbb, IMG_DIM, generator=gen),
            "img_pos_feat": torch.rand(nbb, 7, generator=gen),
            "soft_labels": soft,
            "img_fname": f"img{i}",
        })
    return examples


def mlm_rows(examples, seed: int = 0) -> List[Dict]:
    rng = random.Random(seed)
    rows = []
    for ex in examples:
        input_ids, labels = mlm_text(ex["tokens"], SPECIALS, rng)
        rows.append(dict(ex, input_ids=input_ids, txt_labels=labels))
    return rows


def mrm_rows(examples, seed: int = 0, prob: float = 0.4) -> List[Dict]:
    rng = random.Random(seed)
    return [dict(ex, input_ids=plain_text(ex["tokens"], SPECIALS), img_mask=region_mask(ex["img_feat"].size(0), rng, prob))
            for ex in examples]


def itm_rows(examples, targets: Sequence[int]) -> List[Dict]:
    """ITM rows; a negative shows the next example's image (a different one)."""
    rows = []
    for i, (ex, target) in enumerate(zip(examples, targets)):
        other = examples[(i + 1) % len(examples)]
        shown = ex if target == 1 else other
        rows.append(dict(ex, input_ids=plain_text(ex["tokens"], SPECIALS), img_feat=shown["img_feat"],
                         img_pos_feat=shown["img_pos_feat"], target=target))
    return rows


# -- the reference -----------------------------------------------------------------------------
def trunk_alone(model, input_ids, img_feat, img_pos_feat, img_masks=None) -> torch.Tensor:
    """Final hidden states ``[tl + nbb, H]`` of one example run without padding or packing."""
    ids = torch.as_tensor(input_ids)[None]
    length = ids.size(1) + img_feat.size(0)
    return model.uniter(ids, None, img_feat[None], img_pos_feat[None], torch.ones(1, length, dtype=torch.long),
                        None, img_masks=img_masks, output_all_encoded_layers=False)[0]


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def dense(x, linear):
    return x @ linear.weight.t() + (linear.bias if linear.bias is not None else 0)


def transform(x, first_linear, norm):
    return layer_norm(gelu(dense(x, first_linear)), norm)


def log_softmax(z):
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def mlm_reference(model, rows, decoder_weight=None) -> torch.Tensor:
    """Σ_tokens CE / n_masked, decoding with the word-embedding table (or ``decoder_weight``)."""
    head = model.cls.predictions
    weight = head.decoder.weight if decoder_weight is None else decoder_weight
    total, count = 0.0, 0
    for row in rows:
        hidden = trunk_alone(model, row["input_ids"], row["img_feat"], row["img_pos_feat"])
        for j, label in enumerate(row["txt_labels"]):
            if label == -1:
                continue
            h = transform(hidden[j], head.transform.dense, head.transform.LayerNorm)
            logits = h @ weight.t() + head.bias
            total = total - log_softmax(logits)[label]
            count += 1
    return total / count


def masked_region_states(model, row, use_mask_embedding=True):
    """States of the masked regions: their input is exactly ``mask_embedding.weight[1]``."""
    mask = row["img_mask"]
    feat = row["img_feat"].clone()
    if use_mask_embedding:
        feat = torch.where(mask[:, None], model.uniter.img_embeddings.mask_embedding.weight[1][None], feat)
    hidden = trunk_alone(model, row["input_ids"], feat, row["img_pos_feat"])
    tl = len(row["input_ids"])
    return hidden[tl:][mask]


def mrfr_reference(model, rows, regress_weight=None) -> torch.Tensor:
    head = model.feat_regress
    weight = head.weight if regress_weight is None else regress_weight
    total, count = 0.0, 0
    for row in rows:
        h = transform(masked_region_states(model, row), head.net[0], head.net[2])
        predicted = h @ weight + head.bias  # weight [H, 2048] used transposed: x·Wᵀᵀ
        total = total + ((predicted - row["img_feat"][row["img_mask"]]) ** 2).sum()
        count += predicted.numel()
    return total / count


def region_logits(model, row):
    net = model.region_classifier.net
    return dense(transform(masked_region_states(model, row), net[0], net[2]), net[3])


def mrckl_reference(model, rows) -> torch.Tensor:
    total, count = 0.0, 0
    for row in rows:
        logq = log_softmax(region_logits(model, row))
        p = row["soft_labels"][row["img_mask"]]
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        total = total + (plogp - p * logq).sum()
        count += p.numel()
    return total / count


def mrc_reference(model, rows) -> torch.Tensor:
    total, count = 0.0, 0
    for row in rows:
        logq = log_softmax(region_logits(model, row))
        targets = row["soft_labels"][row["img_mask"]][:, 1:].argmax(-1) + 1
        total = total - logq[torch.arange(len(targets)), targets].sum()
        count += len(targets)
    return total / count


def ipot_alone(cost: torch.Tensor, beta=0.5, iterations=50) -> torch.Tensor:
    """IPOT on one unpadded ``[n_t, n_v]`` cost; returns T ``[n_v, n_t]``."""
    n_t, n_v = cost.shape
    sigma = torch.full((n_t,), 1.0 / n_t, dtype=cost.dtype)
    plan = torch.ones(n_v, n_t, dtype=cost.dtype)
    kernel = torch.exp(-cost.t() / beta)
    for _ in range(iterations):
        q = kernel * plan
        delta = 1.0 / (n_v * (q @ sigma))
        sigma = 1.0 / (n_t * (q.t() @ delta))
        plan = delta[:, None] * q * sigma[None, :]
    return plan


def cosine_cost_alone(txt, img, eps=1e-5):
    txt_unit = txt / txt.norm(dim=-1, keepdim=True).clamp_min(eps)
    img_unit = img / img.norm(dim=-1, keepdim=True).clamp_min(eps)
    return 1 - txt_unit @ img_unit.t()


def itm_reference(model, rows, ot_lambda: float = 0.1) -> torch.Tensor:
    """CE mean over the batch + λ·(Σ_pos d − Σ_neg d)/B with d from per-example IPOT (plan detached)."""
    xe, ot = 0.0, 0.0
    for row in rows:
        hidden = trunk_alone(model, row["input_ids"], row["img_feat"], row["img_pos_feat"])
        pooled = torch.tanh(dense(hidden[0], model.uniter.pooler.dense))
        xe = xe - log_softmax(dense(pooled, model.itm_output))[row["target"]]
        tl = len(row["input_ids"])
        cost = cosine_cost_alone(hidden[:tl], hidden[tl:])
        distance = (cost * ipot_alone(cost.detach()).t()).sum()
        ot = ot + (distance if row["target"] == 1 else -distance)
    return xe / len(rows) + ot_lambda * ot / len(rows)


def grads_of(model, loss) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters()}


def assert_grads_match(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rtol=1e-5, key_bias_atol=1e-6):
    """Per-tensor relative error ≤ rtol; attention key biases (gradient mathematically 0) absolutely."""
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        act = actual[name]
        if name.endswith("attention.self.key.bias"):
            assert act.abs().max() <= key_bias_atol and exp.abs().max() <= key_bias_atol, name
            continue
        scale = exp.norm()
        assert scale > 0 or act.norm() == 0, f"{name}: reference gradient is zero, model's is {act.norm()}"
        if scale > 0:
            err = ((act - exp).norm() / scale).item()
            assert err <= rtol, f"{name}: relative gradient error {err:.2e} > {rtol}"


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-5, what="tensor"):
    """‖actual − expected‖ / ‖expected‖ ≤ rtol (whole-tensor relative error)."""
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol}"
