"""Tiny LXMERT task models and batches shared by the LXMERT tests."""
from __future__ import annotations

import torch

from lxmert_reference import TINY
from villa_plugin.backbones.lxmert import build_lxmert_for_task
from villa_plugin.common.sample_list import SampleList

N_ANSWERS = 5
TXT_LEN, N_BOX = 6, 4


def make_model(head: str = "vqa", seed: int = 0, attn: str = "eager", dropout: float = 0.0):
    torch.manual_seed(seed)
    num_labels = 2 if head == "nlvr2" else N_ANSWERS
    model = build_lxmert_for_task(
        {"architecture": dict(TINY, attn_implementation=attn), "dropout": dropout, "head": f"lxmert_{head}", "num_labels": num_labels}
    )
    model.train()
    return model


def make_batch(head: str = "vqa", seed: int = 1, num_bbs=None) -> SampleList:
    """VQA: 3 rows with soft targets; NLVR2: 2 examples = 4 rows (sentence repeated per image)."""
    g = torch.Generator().manual_seed(seed)
    rows = 4 if head == "nlvr2" else 3
    ids = torch.randint(1, TINY["vocab_size"], (rows, TXT_LEN), generator=g)
    ids[:, 0] = 1  # [CLS]
    if head == "nlvr2":
        ids[1] = ids[0]  # the two rows of an example share the sentence
        ids[3] = ids[2]
        ids[0:2, -2:] = 0  # padding in the first example's sentence
        targets = torch.tensor([1, 0])
    else:
        ids[1, -2:] = 0  # padding in one row
        targets = torch.rand(rows, N_ANSWERS, generator=g)
    x1y1 = torch.rand(rows, N_BOX, 2, generator=g) * 0.5
    boxes = torch.cat([x1y1, x1y1 + torch.rand(rows, N_BOX, 2, generator=g) * 0.5], dim=-1)
    batch = SampleList(
        input_ids=ids,
        img_feat=torch.rand(rows, N_BOX, TINY["visual_feat_dim"], generator=g) * 3,  # post-ReLU, >= 0
        img_pos_feat=boxes,
        targets=targets,
        dataset_name="tiny",
        dataset_type="train",
    )
    if num_bbs is not None:
        batch["num_bbs"] = list(num_bbs)
    return batch


def rows_per_example(head: str) -> int:
    return 2 if head == "nlvr2" else 1


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (0 when both are exactly zero)."""
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom
