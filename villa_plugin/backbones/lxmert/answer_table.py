"""Copy the pre-trained 9,500-answer QA head into a task head, as ``--loadLXMERTQA`` does (lxmert.md §3.2).

``logit_fc.0`` / ``logit_fc.2`` are copied as they are; the last Linear is remapped row by row: each
task answer is normalised by :func:`convert_ans` and looked up among the pre-training answers
(``data/lxmert/all_ans.json``); an answer not found gets a zero row and a zero bias.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch

from villa_plugin.common.errors import CheckpointError

ANS_CONVERT = {
    "a man": "man",
    "the man": "man",
    "a woman": "woman",
    "the woman": "woman",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}
SOURCE_PREFIX = "answer_head.logit_fc."
TARGET_PREFIX = "logit_fc."


def convert_ans(answer: str) -> str:
    """The reference's answer normalisation: lower-case, strip a trailing ".", a leading a/an/the,
    number words to digits, grey -> gray."""
    if not answer:
        return ""
    answer = answer.lower()
    if answer[-1] == ".":
        answer = answer[:-1].strip()
    for article in ("a ", "an ", "the "):
        if answer.startswith(article):
            answer = answer[len(article):].strip()
    return ANS_CONVERT.get(answer, answer)


def pretrain_answer_list(all_ans: Sequence[Union[str, Mapping[str, Any]]]) -> List[str]:
    """The answers of ``all_ans.json`` (a list of ``{"ans": ...}`` records or of strings)."""
    return [item["ans"] if isinstance(item, Mapping) else str(item) for item in all_ans]


def remap_answer_head(
    answer_head: Mapping[str, torch.Tensor],
    label2ans: Sequence[str],
    pretrain_answers: Sequence[str],
    source: str = "checkpoint",
) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """``{"answer_head.logit_fc.*": tensor}`` -> ``{"logit_fc.*": tensor}`` for the task answers
    ``label2ans``; returns the tensors and ``{"copied": n, "zeroed": m}``."""
    missing = [f"{SOURCE_PREFIX}{p}" for p in ("0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias")
               if f"{SOURCE_PREFIX}{p}" not in answer_head]
    if missing:
        raise CheckpointError(f"{source}: the pre-trained QA head is incomplete, missing {missing}.")
    weight, bias = answer_head[SOURCE_PREFIX + "3.weight"], answer_head[SOURCE_PREFIX + "3.bias"]
    if weight.size(0) != len(pretrain_answers):
        raise CheckpointError(
            f"{source}: '{SOURCE_PREFIX}3.weight' has {weight.size(0)} answer rows but the pre-training answer "
            f"list has {len(pretrain_answers)} (all_ans.json of the same release is needed)."
        )
    index = {answer: i for i, answer in enumerate(pretrain_answers)}
    new_weight = weight.new_zeros((len(label2ans), weight.size(1)))
    new_bias = bias.new_zeros((len(label2ans),))
    copied = 0
    for label, answer in enumerate(label2ans):
        row = index.get(convert_ans(answer))
        if row is not None:
            new_weight[label] = weight[row]
            new_bias[label] = bias[row]
            copied += 1
    out = {TARGET_PREFIX + k[len(SOURCE_PREFIX):]: v for k, v in answer_head.items() if not k.startswith(SOURCE_PREFIX + "3.")}
    out[TARGET_PREFIX + "3.weight"] = new_weight
    out[TARGET_PREFIX + "3.bias"] = new_bias
    return out, {"copied": copied, "zeroed": len(label2ans) - copied}


__all__ = ["convert_ans", "pretrain_answer_list", "remap_answer_head", "ANS_CONVERT"]
