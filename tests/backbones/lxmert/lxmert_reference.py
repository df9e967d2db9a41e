"""An independent LXMERT forward written from lxmert.md §2 in plain torch, on official key names.

Parameters are a dict keyed like the official fine-tuned file minus ``lxrt_encoder.model.``:
``bert.embeddings.*``, ``bert.encoder.{visn_fc,layer,r_layers,x_layers}.*``, ``bert.pooler.*``,
``logit_fc.{0,2,3}.*``. No module of villa_plugin is used here except to build the tiny config.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from villa_plugin.backbones.lxmert.keys import export_state_dict

TINY = dict(
    vocab_size=40, hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=2, r_layers=1,
    x_layers=2, visual_feat_dim=12, max_position_embeddings=16,
)
EPS = 1e-12


def official_params(model) -> Dict[str, torch.Tensor]:
    """The model's weights under official names, as fresh fp32 leaves (frozen ones without grad)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    state = export_state_dict(model, "official_finetuned")
    out = {}
    for key, value in state.items():
        ours = key.replace("lxrt_encoder.model.bert.", "lxmert.")
        name = key.replace("lxrt_encoder.model.", "")
        out[name] = value.detach().clone().float().requires_grad_(ours not in frozen)
    return out


def gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x, P, name):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * P[name + ".weight"] + P[name + ".bias"]


def linear(x, P, name):
    return x @ P[name + ".weight"].t() + P[name + ".bias"]


def attention(P, name, x, context, mask_add, heads):
    b, lq, h = x.shape
    d = h // heads

    def split(t):
        return t.view(b, t.size(1), heads, d).permute(0, 2, 1, 3)

    q, k, v = split(linear(x, P, name + ".query")), split(linear(context, P, name + ".key")), split(linear(context, P, name + ".value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask_add is not None:
        scores = scores + mask_add
    out = torch.softmax(scores, -1) @ v
    return out.permute(0, 2, 1, 3).reshape(b, lq, h)


def residual(P, name, hidden, res):
    return layer_norm(linear(hidden, P, name + ".dense") + res, P, name + ".LayerNorm")


def self_att(P, name, x, mask, heads):
    return residual(P, name + ".output", attention(P, name + ".self", x, x, mask, heads), x)


def bert_layer(P, name, x, mask, heads):
    a = self_att(P, name + ".attention", x, mask, heads)
    return residual(P, name + ".output", gelu(linear(a, P, name + ".intermediate.dense")), a)


def x_layer(P, name, lang, lmask, visn, vmask, heads):
    cross = name + ".visual_attention"
    lang_att = residual(P, cross + ".output", attention(P, cross + ".att", lang, visn, vmask, heads), lang)
    visn_att = residual(P, cross + ".output", attention(P, cross + ".att", visn, lang, lmask, heads), visn)
    lang_att = self_att(P, name + ".lang_self_att", lang_att, lmask, heads)
    visn_att = self_att(P, name + ".visn_self_att", visn_att, vmask, heads)
    lang_out = residual(P, name + ".lang_output", gelu(linear(lang_att, P, name + ".lang_inter.dense")), lang_att)
    visn_out = residual(P, name + ".visn_output", gelu(linear(visn_att, P, name + ".visn_inter.dense")), visn_att)
    return lang_out, visn_out


def mask_add(mask):
    return None if mask is None else (1.0 - mask[:, None, None, :].float()) * -10000.0


def reference_logits(
    P, cfg, input_ids, text_mask, feats, boxes, *, rows_per_example=1, visual_mask=None,
    txt_delta: Optional[torch.Tensor] = None, img_delta: Optional[torch.Tensor] = None,
):
    """Logits of the official LXMERT + logit_fc head (dropout off)."""
    heads = cfg["num_attention_heads"]
    e = "bert.embeddings."
    words = F.embedding(input_ids, P[e + "word_embeddings.weight"], padding_idx=0)
    if txt_delta is not None:
        words = words + txt_delta
    pos_ids = torch.arange(input_ids.size(1)).unsqueeze(0).expand_as(input_ids)
    emb = (words + F.embedding(pos_ids, P[e + "position_embeddings.weight"], padding_idx=0)
           + F.embedding(torch.zeros_like(input_ids), P[e + "token_type_embeddings.weight"], padding_idx=0))
    lang = layer_norm(emb, P, e + "LayerNorm")
    v = "bert.encoder.visn_fc."
    f = feats + img_delta if img_delta is not None else feats
    visn = (layer_norm(linear(f, P, v + "visn_fc"), P, v + "visn_layer_norm")
            + layer_norm(linear(boxes, P, v + "box_fc"), P, v + "box_layer_norm")) / 2
    lmask, vmask = mask_add(text_mask), mask_add(visual_mask)
    for i in range(cfg["l_layers"]):
        lang = bert_layer(P, f"bert.encoder.layer.{i}", lang, lmask, heads)
    for i in range(cfg["r_layers"]):
        visn = bert_layer(P, f"bert.encoder.r_layers.{i}", visn, vmask, heads)
    for i in range(cfg["x_layers"]):
        lang, visn = x_layer(P, f"bert.encoder.x_layers.{i}", lang, lmask, visn, vmask, heads)
    pooled = torch.tanh(linear(lang[:, 0], P, "bert.pooler.dense"))
    pooled = pooled.reshape(pooled.size(0) // rows_per_example, -1)
    hidden = layer_norm(gelu(linear(pooled, P, "logit_fc.0")), P, "logit_fc.2")
    return linear(hidden, P, "logit_fc.3")
