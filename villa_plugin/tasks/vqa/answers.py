"""VQA answer normalisation and soft scores, for building targets from VQA v2 annotation JSON.

UNITER never released its VQA preprocessing; this follows the official VQA evaluation's answer
normalisation (punctuation, number words, articles, common contractions) as BUTD's
``compute_softscore.py`` does, then scores each answer by how many of the (10) annotators gave it:

- ``butd`` (default): 0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >=4 annotators. This equals the
  official accuracy ``min(1, count/3)`` averaged over the 10 leave-one-annotator-out subsets.
- ``min3``: the raw ``min(1, count/3)``.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Tuple

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_OUTSIDE_NUMBER = re.compile(r"(?<!\d)(\.)(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions written without the apostrophe -> the official spelling (the frequent ones).
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
    "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's",
    "shes": "she's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's",
    "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

SCORE_RULES = ("butd", "min3")


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (lower case, punctuation, digits, articles, contractions)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_OUTSIDE_NUMBER.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def count_score(count: int, rule: str = "butd") -> float:
    """Soft score of an answer given by ``count`` annotators."""
    if rule == "butd":
        return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0
    if rule == "min3":
        return min(1.0, count / 3.0)
    raise ValueError(f"unknown soft score rule {rule!r}; choose one of {SCORE_RULES}")


def soft_target(answers: Iterable[str], ans2label: Mapping[str, int], rule: str = "butd") -> Dict[str, List]:
    """``{'labels': [...], 'scores': [...]}`` over the answers that are in the vocabulary (sorted by label)."""
    counts = Counter(normalize_answer(a) for a in answers)
    pairs: List[Tuple[int, float]] = sorted(
        (ans2label[a], count_score(c, rule)) for a, c in counts.items() if a in ans2label
    )
    return {"labels": [p[0] for p in pairs], "scores": [p[1] for p in pairs]}
