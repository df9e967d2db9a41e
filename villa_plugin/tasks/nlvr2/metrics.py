"""NLVR2's metrics ``nlvr2_accuracy`` and ``nlvr2_consistency`` (the batch fields come from the
``nlvr2`` builder)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from villa_plugin.metrics import Accuracy, BaseMetric
from villa_plugin.registry import registry


def nlvr2_sentence_key(identifier: str) -> str:
    """The sentence an NLVR2 identifier belongs to: the identifier without its third dash field
    (``dev-850-0-1`` -> ``dev-850-1``), as the official scorer groups them for consistency."""
    parts = str(identifier).split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} does not have the form split-set-pair-sentence")
    return "-".join(parts[:2] + parts[3:])


@registry.register_metric("nlvr2_accuracy")
class Nlvr2Accuracy(Accuracy):
    """NLVR2 accuracy: argmax of the ``[examples, 2]`` logits against ``targets`` (1 = True)."""


@registry.register_metric("nlvr2_consistency")
class Nlvr2Consistency(BaseMetric):
    """Fraction of unique sentences whose predictions are all correct (NLVR2's consistency).

    Reads ``sentence_index`` (LongTensor [B]: the example's sentence among the split's
    ``num_sentences`` unique sentences, see :func:`nlvr2_sentence_key`) and ``num_sentences`` from
    the batch. State: per-sentence counts of examples seen and wrong, summed across ranks (every
    rank numbers sentences over the whole split, so the vectors line up).
    """

    def reset(self) -> None:
        self.seen: Optional[torch.Tensor] = None
        self.wrong: Optional[torch.Tensor] = None

    def update(self, batch, output: Dict[str, Any]) -> None:
        if batch.get("targets") is None:
            return
        if batch.get("sentence_index") is None or batch.get("num_sentences") is None:
            raise KeyError("nlvr2_consistency needs the batch fields sentence_index and num_sentences "
                           "(the nlvr2 builder's batches carry them)")
        size = int(batch["num_sentences"])
        if self.seen is None:
            self.seen = torch.zeros(size, dtype=torch.float64)
            self.wrong = torch.zeros(size, dtype=torch.float64)
        index = batch["sentence_index"].detach().to("cpu", torch.long).reshape(-1)
        predicted = output["scores"].detach().argmax(dim=-1).cpu().reshape(-1)
        truth = batch["targets"].detach().cpu().long().reshape(-1)
        self.seen.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        self.wrong.index_add_(0, index, (predicted != truth).to(torch.float64))

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None) -> None:
        if self.seen is None:
            return
        packed = torch.cat([self.seen, self.wrong])
        packed = all_reduce_sum(packed.to(device) if device is not None else packed).detach().cpu()
        self.seen, self.wrong = packed[: self.seen.numel()], packed[self.seen.numel():]

    def compute(self) -> float:
        if self.seen is None or not bool((self.seen > 0).any()):
            return 0.0
        present = self.seen > 0
        return float(((self.wrong == 0) & present).sum() / present.sum())
