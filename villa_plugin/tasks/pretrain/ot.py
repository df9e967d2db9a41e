"""WRA: word-region alignment by optimal transport, solved with IPOT (uniter-pretraining.md §7).

All masks are bool with ``True`` = padding (the official code used uint8, which torch >= 2 rejects).
The transport plan is computed under ``no_grad`` on the detached cost, so the distance's gradient
reaches the hidden states only through the cosine costs (∂d/∂C = Tᵀ).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

IPOT_BETA = 0.5
IPOT_ITERATIONS = 50
IPOT_INNER = 1
COSINE_EPS = 1e-5
PAD_PENALTY = 1e4  # added to the denominators at padded positions so δ and σ vanish there


def cosine_cost(txt: torch.Tensor, img: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """``1 - cos(txt_t, img_v)``: ``[B, Lt, D]``, ``[B, Lv, D]`` -> ``[B, Lt, Lv]`` (norms clamped at ``eps``)."""
    txt_unit = F.normalize(txt, p=2, dim=-1, eps=eps)
    img_unit = F.normalize(img, p=2, dim=-1, eps=eps)
    return 1 - txt_unit.matmul(img_unit.transpose(1, 2))


@torch.no_grad()
def ipot(
    cost: torch.Tensor,
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    beta: float = IPOT_BETA,
    iterations: int = IPOT_ITERATIONS,
    inner: int = IPOT_INNER,
) -> torch.Tensor:
    """Transport plan ``T`` ``[B, Lv, Lt]`` of the batched IPOT (Xie et al. 2018) on ``cost`` ``[B, Lt, Lv]``.

    Marginals are uniform over the real positions (``1/n_t`` per token, ``1/n_v`` per region); rows
    and columns of padded positions are zero. Equal to IPOT on each example's unpadded block.
    """
    batch, n_txt_max, n_img_max = cost.shape
    dtype = cost.dtype
    n_txt = (~txt_pad).sum(dim=1).to(dtype).view(batch, 1, 1)
    n_img = (~img_pad).sum(dim=1).to(dtype).view(batch, 1, 1)
    joint_pad = (txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)).transpose(1, 2)  # [B, Lv, Lt]
    txt_penalty = (txt_pad.to(dtype) * PAD_PENALTY).unsqueeze(1)  # [B, 1, Lt]
    img_penalty = (img_pad.to(dtype) * PAD_PENALTY).unsqueeze(1)  # [B, 1, Lv]

    sigma = (torch.ones(batch, n_txt_max, dtype=dtype, device=cost.device) / n_txt.view(batch, 1))
    sigma = sigma.masked_fill(txt_pad, 0).view(batch, n_txt_max, 1)
    plan = torch.ones(batch, n_img_max, n_txt_max, dtype=dtype, device=cost.device).masked_fill(joint_pad, 0)
    kernel = torch.exp(-cost.transpose(1, 2) / beta).masked_fill(joint_pad, 0)
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(inner):
            delta = 1 / (n_img * q.matmul(sigma).view(batch, 1, n_img_max) + img_penalty)  # [B, 1, Lv]
            sigma = (1 / (n_txt * delta.matmul(q) + txt_penalty)).view(batch, n_txt_max, 1)
        plan = delta.view(batch, n_img_max, 1) * q * sigma.view(batch, 1, n_txt_max)
    return plan.masked_fill(joint_pad, 0)


def optimal_transport_distance(
    txt: torch.Tensor, img: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor
) -> torch.Tensor:
    """Per-example OT distance ``d_i = Σ_{t,v} C[t,v]·T[v,t]`` ``[B]`` (cost with pads zeroed, plan detached)."""
    cost = cosine_cost(txt, img)
    joint_pad = txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)
    cost = cost.masked_fill(joint_pad, 0)
    plan = ipot(cost.detach(), txt_pad, img_pad)
    return (cost * plan.transpose(1, 2)).sum(dim=(1, 2))


def unpack_for_ot(sequence_output: torch.Tensor, max_txt_len: int, max_num_bb: int, ot_inputs: Mapping):
    """Text ``[B, max_tl, H]`` and region ``[B, max_nbb, H]`` states from the packed output, via ``ot_scatter``."""
    batch, _, hidden = sequence_output.shape
    length = max(int(ot_inputs["scatter_max"]) + 1, max_txt_len + max_num_bb)
    index = ot_inputs["ot_scatter"].unsqueeze(-1).expand_as(sequence_output)
    unpacked = sequence_output.new_zeros(batch, length, hidden).scatter(1, index, sequence_output)
    return unpacked[:, :max_txt_len], unpacked[:, max_txt_len:max_txt_len + max_num_bb]


def wra_distance(sequence_output: torch.Tensor, max_txt_len: int, max_num_bb: int, ot_inputs: Mapping) -> torch.Tensor:
    """The WRA distance of every (caption, image) pair ``[B]``, in fp32 whatever the compute dtype."""
    txt, img = unpack_for_ot(sequence_output, max_txt_len, max_num_bb, ot_inputs)
    txt_pad, img_pad = ot_inputs["txt_pad"].bool(), ot_inputs["img_pad"].bool()
    return optimal_transport_distance(txt.float(), img.float(), txt_pad, img_pad)


__all__ = ["cosine_cost", "ipot", "optimal_transport_distance", "unpack_for_ot", "wra_distance"]
