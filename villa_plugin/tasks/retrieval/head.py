"""Image-text retrieval head ``itm`` (UNITER's ``model/itm.py``), with hard-negative mining.

Modules (flat, so the state-dict keys are the official top-level ones):

- ``itm_output`` = Linear(H, 2): the pretraining ITM classifier, kept only as the initialisation
  source of ``rank_output`` (frozen: it is not used in the forward);
- ``rank_output`` = Linear(H, 1) on the trunk pooler: the retrieval score. When a checkpoint that
  holds ``itm_output`` (``uniter-*.pt`` / ``villa-*.pt``) is loaded and ``rank_output`` is not in
  it, ``rank_output`` is initialised from ``itm_output`` row 1 (the "match" logit), as UNITER's
  ``init_output()``.

Two kinds of batches (built by the ``retrieval`` builder):

- **pair batches** (evaluation, prediction): one row per (text, image) pair; scores ``[B, 1]``.
- **query batches** (training): the top-level rows are the *positive pair* of each query (text
  queries first, then image queries), plus banks of texts / images and, per query, ``N`` sampled
  negative candidates (``neg_txt`` / ``neg_img`` [Q, N], bank indices). The head then

  1. scores all ``Q x N`` candidates **without gradient, with the trunk in eval mode** (chunks of
     ``mining_chunk_size`` rows) and keeps the ``hard_neg_size`` highest-scoring ones per query
     (cached per batch and parameter version, so VILLA's 1 + K forwards of a micro-batch mine once);
  2. scores the kept hard negatives with gradient in the current mode;
  3. returns ``[Q, 1 + n_hard]`` scores, column 0 the positive.

  Every candidate row is packed with its own text length (``packed_layout``): UNITER's
  ``ItmRankDatasetHardNegFromImage`` gather bug (the last caption's length used for every row) is
  not reproduced.

Loss ``itm_triplet``: ``clamp(margin + σ(s_neg) - σ(s_pos), 0)``, mean over a query's hard
negatives, then (``reduction: sum_directions``, UNITER's) the mean over the queries of each
direction summed over the two directions, which is what ``train_itm_hard_negatives.py`` accumulates
per update (``loss.mean() / train_batch_size`` for a text and an image query per step).

VILLA for retrieval (not in the official code; our definition): the perturbations are the
adversarial engine's, on the top-level rows, i.e. on the **positive pair's** text and/or image; the
hard negatives are scored unperturbed. The KL is between the clean and the perturbed softmax over
each query's ``1 + n_hard`` candidate scores, reduced with ``sum_classes_mean`` (sum over the
candidates, mean over the queries). With dropout 0 and δ = 0 the two rows are identical, so the KL
is exactly 0.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from villa_plugin.datasets.task_common import packed_layout
from villa_plugin.models.heads import TaskHead
from villa_plugin.models.trunk import TrunkDims, TrunkEncoder, TrunkOutput
from villa_plugin.registry import registry

logger = logging.getLogger(__name__)

QUERY_FIELDS = ("neg_txt", "neg_img", "txt_bank_ids", "txt_bank_lens", "img_bank_feat", "img_bank_pos", "img_bank_nbb")
TEXT_QUERY, IMAGE_QUERY = 0, 1
DEFAULT_CHUNK = 400  # UNITER's inf_minibatch_size


@registry.register_head("itm")
class ItmRankHead(TaskHead):
    """``itm_output`` (frozen init source) and ``rank_output``, plus the hard-negative miner.

    Pair batches: ``[B, 1]`` rank scores. Query batches: ``[Q, 1 + n_hard]`` (positive first)."""

    module_name = "itm_head"
    kl_reduction = "sum_classes_mean"

    def __init__(self, dims: TrunkDims, num_labels: int = 1, head_config: Optional[Dict[str, Any]] = None):
        super().__init__(dims, num_labels, head_config or {})
        self.itm_output = nn.Linear(dims.hidden_size, 2)  # defined first: loaded before rank_output
        self.rank_output = nn.Linear(dims.hidden_size, 1)
        self.itm_output.requires_grad_(False)
        self.rank_output.register_load_state_dict_post_hook(self._init_rank_from_itm)
        self.mining_passes = 0  # how many times candidates were actually scored (cache misses)
        self._cache: Optional[Tuple[Any, ...]] = None

    # -- rank_output <- itm_output row 1 -------------------------------------------------------
    def _init_rank_from_itm(self, module: nn.Module, incompatible_keys) -> None:
        missing = incompatible_keys.missing_keys
        rank_missing = [k for k in missing if k.endswith("rank_output.weight") or k.endswith("rank_output.bias")]
        itm_missing = [k for k in missing if k.endswith("itm_output.weight") or k.endswith("itm_output.bias")]
        if len(rank_missing) != 2 or itm_missing:
            return  # rank_output came with the checkpoint, or there is no itm_output to copy
        init_rank_output_from_itm(self)
        for key in rank_missing:
            missing.remove(key)
        logger.info("rank_output initialised from itm_output row 1 (the checkpoint has no rank_output)")

    # -- hard negatives ------------------------------------------------------------------------
    def hard_negatives(self, encoder: TrunkEncoder, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(txt, img)`` bank indices ``[Q, n_hard]`` of each query's highest-scoring negatives.

        Candidates are scored with the trunk in eval mode and without gradient; the result is
        cached for the batch (``batch_token``) and the current parameter version.
        """
        neg_txt, neg_img = batch["neg_txt"], batch["neg_img"]
        n_hard = min(int(batch.get("hard_neg_size", neg_txt.size(1))), int(neg_txt.size(1)))
        if n_hard >= neg_txt.size(1):
            return neg_txt, neg_img
        # Optimizer steps and weight loads update parameters in place, which changes both versions.
        version = (encoder.version(), int(self.rank_output.weight._version))
        key = (batch.get("batch_token"), version, n_hard, tuple(neg_txt.shape))
        if key[0] is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        with encoder.evaluating(), torch.no_grad():
            scores = score_bank_pairs(
                encoder, self.rank_output, batch, neg_txt.reshape(-1), neg_img.reshape(-1),
                chunk_size=int(batch.get("mining_chunk_size") or DEFAULT_CHUNK),
            ).view(neg_txt.shape)
        self.mining_passes += 1
        chosen = select_hard(scores, n_hard)
        hard_txt, hard_img = neg_txt.gather(1, chosen), neg_img.gather(1, chosen)
        self._cache = (key, hard_txt, hard_img)
        return hard_txt, hard_img

    def forward(self, trunk: TrunkOutput, batch: Any) -> torch.Tensor:
        positive = self.rank_output(trunk.require_pooled("itm"))
        if not is_query_batch(batch):
            return positive
        missing = [f for f in QUERY_FIELDS if batch.get(f) is None]
        if missing:
            raise KeyError(f"A retrieval query batch needs the fields {missing} (the retrieval builder's training batches carry them)")
        if trunk.encoder is None:
            raise RuntimeError("The itm head mines hard negatives with the trunk: the model must pass TrunkOutput.encoder")
        hard_txt, hard_img = self.hard_negatives(trunk.encoder, batch)
        negative = score_bank_pairs(trunk.encoder, self.rank_output, batch, hard_txt.reshape(-1), hard_img.reshape(-1))
        return torch.cat([positive, negative.view(hard_txt.shape).to(positive.dtype)], dim=1)


def init_rank_output_from_itm(head: ItmRankHead) -> None:
    """``rank_output`` := row 1 of ``itm_output`` (UNITER's ``init_output``)."""
    with torch.no_grad():
        head.rank_output.weight.copy_(head.itm_output.weight[1:2])
        head.rank_output.bias.copy_(head.itm_output.bias[1:2])


def select_hard(scores: torch.Tensor, n_hard: int) -> torch.Tensor:
    """Column indices ``[Q, n_hard]`` of the ``n_hard`` highest scores of each row (best first)."""
    return scores.topk(n_hard, dim=1, largest=True, sorted=True).indices


def score_bank_pairs(encoder: TrunkEncoder, rank_output: nn.Module, batch: Any, txt_idx: torch.Tensor,
                     img_idx: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
    """Rank scores ``[R]`` of the pairs (bank text ``txt_idx[r]``, bank image ``img_idx[r]``).

    Rows are packed with their own lengths; ``chunk_size > 0`` runs the trunk on at most that many
    rows at a time (for no-grad scoring of many candidates).
    """
    rows = int(txt_idx.numel())
    step = rows if chunk_size <= 0 else int(chunk_size)
    out = []
    for start in range(0, rows, max(step, 1)):
        t, i = txt_idx[start : start + step], img_idx[start : start + step]
        ids = batch["txt_bank_ids"].index_select(0, t)
        feat = batch["img_bank_feat"].index_select(0, i)
        gather_index, attn_masks = packed_layout(
            batch["txt_bank_lens"].index_select(0, t), batch["img_bank_nbb"].index_select(0, i), ids.size(1), feat.size(1)
        )
        position_ids = torch.arange(ids.size(1), device=ids.device).unsqueeze(0)
        rows = {"input_ids": ids, "position_ids": position_ids, "img_feat": feat,
                "img_pos_feat": batch["img_bank_pos"].index_select(0, i), "attn_masks": attn_masks,
                "gather_index": gather_index}
        out.append(rank_output(encoder.encode(rows).pooled).squeeze(-1))
    return torch.cat(out) if out else torch.zeros(0, device=txt_idx.device)


def is_query_batch(batch: Any) -> bool:
    """True for a training batch of queries with candidates (False for pair batches)."""
    return hasattr(batch, "get") and batch.get("neg_txt") is not None


@registry.register_loss("itm_triplet")
class ItmTripletLoss(nn.Module):
    """UNITER's triplet ranking loss on ``[Q, 1 + n]`` scores (column 0 the positive).

    Per query: ``mean_k clamp(margin + σ(s_k) - σ(s_0), 0)`` over its negatives. ``reduction``:
    ``sum_directions`` (UNITER: mean over the queries of each direction, ``query_dir`` 0 text / 1
    image, summed over directions) or ``mean`` (mean over all queries).
    """

    def __init__(self, margin: float = 0.2, reduction: str = "sum_directions"):
        super().__init__()
        if reduction not in ("sum_directions", "mean"):
            raise ValueError(f'itm_triplet reduction must be "sum_directions" or "mean", got {reduction!r}')
        self.margin, self.reduction = float(margin), reduction

    def forward(self, sample_list, model_output: Dict[str, Any]) -> torch.Tensor:
        scores = model_output["scores"].float()
        if scores.dim() != 2 or scores.size(1) < 2:
            raise ValueError(
                f"itm_triplet needs [queries, 1 + negatives] scores (training batches of the retrieval "
                f"builder), got shape {tuple(scores.shape)}"
            )
        prob = torch.sigmoid(scores)
        hinge = torch.clamp(self.margin + prob[:, 1:] - prob[:, :1], min=0).mean(dim=1)
        directions = sample_list.get("query_dir") if hasattr(sample_list, "get") else None
        if self.reduction == "mean" or directions is None:
            return hinge.mean()
        directions = directions.to(hinge.device).reshape(-1)
        total = hinge.new_zeros(())
        for direction in (TEXT_QUERY, IMAGE_QUERY):
            mask = (directions == direction).to(hinge.dtype)
            total = total + (hinge * mask).sum() / mask.sum().clamp(min=1)
        return total


__all__ = [
    "ItmRankHead",
    "ItmTripletLoss",
    "init_rank_output_from_itm",
    "is_query_batch",
    "score_bank_pairs",
    "select_hard",
    "TEXT_QUERY",
    "IMAGE_QUERY",
]
