"""VCR's metrics ``vcr_q_a``, ``vcr_qa_r``, ``vcr_q_ar`` and the per-question score helpers (the batch
fields come from the ``vcr`` builder)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from villa_plugin.metrics import BaseMetric
from villa_plugin.registry import registry


def vcr_candidate_scores(scores: torch.Tensor, num_questions: int) -> torch.Tensor:
    """Per-question candidate scores ``[n_q, rows_per_question]`` from the head's row logits:
    ``logit[:, 1]`` of ``[rows, 2]`` logits (a single column is taken as it is)."""
    column = scores[:, 1] if scores.dim() == 2 and scores.size(1) == 2 else scores.reshape(scores.size(0), -1)[:, -1]
    if num_questions <= 0 or column.numel() % num_questions:
        raise ValueError(f"{column.numel()} VCR rows do not split evenly over {num_questions} questions")
    return column.reshape(num_questions, -1)


def vcr_rationale_scores(per_question: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """The 4 rationale scores of each question, conditioned on ``answers`` [n_q].

    8 rows per question (4 answers, 4 rationales given the gt answer): columns 4..7. 20 rows (4
    answers, then 4 rationales for each of the 4 answers): columns 4+4a..7+4a, chosen **per
    question** (the official VILLA code used one index for the whole batch).
    """
    rows = per_question.size(1)
    if rows == 8:
        return per_question[:, 4:8]
    if rows == 20:
        offsets = 4 + 4 * answers.to(per_question.device).long().reshape(-1, 1) + torch.arange(4, device=per_question.device)
        return per_question.gather(1, offsets)
    raise ValueError(f"VCR batches have 8 or 20 rows per question, got {rows}")


def vcr_correct(batch, output: Dict[str, Any]):
    """``(qa_correct, qar_correct)`` bool tensors [n_q] of a labelled VCR batch (None if unlabelled)."""
    if batch.get("qa_targets") is None or batch.get("qar_targets") is None:
        return None
    qa_t = batch["qa_targets"].detach().reshape(-1).long()
    qar_t = batch["qar_targets"].detach().reshape(-1).long()
    per_question = vcr_candidate_scores(output["scores"].detach().float(), qa_t.numel())
    qa_correct = per_question[:, :4].argmax(dim=-1).cpu() == qa_t.cpu()
    qar_correct = vcr_rationale_scores(per_question, qa_t).argmax(dim=-1).cpu() == qar_t.cpu()
    return qa_correct, qar_correct


class _VcrMetric(BaseMetric):
    state_names = ("correct", "total")

    def _select(self, qa_correct: torch.Tensor, qar_correct: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, batch, output: Dict[str, Any]) -> None:
        result = vcr_correct(batch, output)
        if result is None:
            return
        chosen = self._select(*result)
        self._add("correct", chosen.sum())
        self._add("total", torch.tensor(chosen.numel()))

    def compute(self) -> float:
        return float(self.correct / self.total) if self.total > 0 else 0.0


@registry.register_metric("vcr_q_a")
class VcrQA(_VcrMetric):
    """Q->A: the highest-scoring of the 4 answers is the right one."""

    def _select(self, qa_correct, qar_correct):
        return qa_correct


@registry.register_metric("vcr_qa_r")
class VcrQAR(_VcrMetric):
    """QA->R: given the right answer, the highest-scoring of the 4 rationales is the right one."""

    def _select(self, qa_correct, qar_correct):
        return qar_correct


@registry.register_metric("vcr_q_ar")
class VcrQAtoR(_VcrMetric):
    """Q->AR: both the answer and the rationale (given the right answer) are right."""

    def _select(self, qa_correct, qar_correct):
        return qa_correct & qar_correct
