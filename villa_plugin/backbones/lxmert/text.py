"""LXMERT's text input (lxmert.md §4): bert-base-uncased WordPiece, ``[CLS] + tokens[:L-2] + [SEP]``.

The tokenizer is the project's :class:`villa_plugin.datasets.text.WordPieceTokenizer` on a local
``vocab.txt`` with ``lowercase=True`` (lower-casing and accent stripping, as BERT uncased does).
The reference pads every sentence to exactly 20 ids; padding to the batch maximum gives the same
logits and the same δ on real tokens (§4), so only the truncation matters here.
"""
from __future__ import annotations

from typing import List

from villa_plugin.common.errors import DataError

MAX_SEQ_LENGTH = 20  # VQA, GQA, NLVR2 and pre-training, [CLS] and [SEP] included


def lxmert_input_ids(tokenizer, sentence: str, max_seq_length: int = MAX_SEQ_LENGTH) -> List[int]:
    """``[CLS] + wordpieces[:max_seq_length - 2] + [SEP]`` as ids (segment ids are all 0, no padding)."""
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must leave room for [CLS] and [SEP], got {max_seq_length}")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise DataError("The LXMERT vocabulary lacks [CLS] or [SEP]; use bert-base-uncased's vocab.txt.")
    return [cls_id] + tokenizer.encode(sentence)[: max_seq_length - 2] + [sep_id]


__all__ = ["MAX_SEQ_LENGTH", "lxmert_input_ids"]
