"""Helpers for the UNITER model tests: a tiny UNITER config and UNITER-style batches."""
from __future__ import annotations

import torch

from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.collate import build_gather_index
from villa_plugin.backbones.uniter.model import UniterConfig

TINY_ARCH = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}


def tiny_config(**overrides) -> UniterConfig:
    values = dict(TINY_ARCH)
    values.update(overrides)
    return UniterConfig(**values)


def tiny_model_config(**overrides) -> dict:
    """A ``model_config.uniter`` block for a tiny model (5 answers)."""
    cfg = {
        "uniter_config": "base",
        "architecture": dict(TINY_ARCH),
        "dropout": 0.1,
        "head": "vqa",
        "num_labels": 5,
        "pretrained_checkpoint": "",
        "losses": [{"type": "logit_bce"}],
    }
    cfg.update(overrides)
    return cfg


def make_batch(txt_lens, num_bbs, vocab_size=100, num_labels=None, seed=0) -> SampleList:
    """A packed UNITER batch (reference layout) with random ids/features; pads are zero."""
    gen = torch.Generator().manual_seed(seed)
    batch_size, max_tl, max_bb = len(txt_lens), max(txt_lens), max(num_bbs)
    input_ids = torch.zeros(batch_size, max_tl, dtype=torch.long)
    img_feat = torch.zeros(batch_size, max_bb, 2048)
    img_pos_feat = torch.zeros(batch_size, max_bb, 7)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        input_ids[i, :tl] = torch.randint(1, vocab_size, (tl,), generator=gen)
        img_feat[i, :nbb] = torch.rand(nbb, 2048, generator=gen)
        img_pos_feat[i, :nbb] = torch.rand(nbb, 7, generator=gen)
    gather_index, attn_masks = build_gather_index(txt_lens, num_bbs, max_tl, max_bb)
    batch = SampleList(
        input_ids=input_ids,
        position_ids=torch.arange(max_tl).unsqueeze(0),
        img_feat=img_feat,
        img_pos_feat=img_pos_feat,
        attn_masks=attn_masks,
        gather_index=gather_index,
        txt_lens=list(txt_lens),
        num_bbs=list(num_bbs),
        dataset_name="vqa2",
        dataset_type="train",
    )
    if num_labels is not None:
        batch["targets"] = torch.rand(batch_size, num_labels, generator=gen)
    return batch
