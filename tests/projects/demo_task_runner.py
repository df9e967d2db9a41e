"""Runs a bundled task demo through ``mmf_run`` (the real CLI, trainer and data) for the demo tests."""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import pytest
import torch

from villa_plugin.cli import run
import villa_plugin.tasks.vqa.demo as vqa_demo


def mmf_run(capsys, config: str, tmp_path, *extra: str) -> Tuple[int, List[Dict], float]:
    """Exit code, the JSON log records and the wall time of one ``mmf_run`` in ``tmp_path``."""
    start = time.perf_counter()
    code = run([
        f"config={config}", f"env.cache_dir={tmp_path}/cache", f"env.save_dir={tmp_path}/save",
        "training.device=cpu", "training.tensorboard=false", "training.log_format=json", *extra,
    ])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out.splitlines()
    records = [json.loads(line[line.index('{"update"'):]) for line in out if '{"update"' in line]
    return code, records, seconds


def final_metrics(records: List[Dict], prefix: str) -> Dict[str, float]:
    """The last logged values of keys starting with ``prefix`` (the final evaluation)."""
    values: Dict[str, float] = {}
    for record in records:
        values.update({k: v for k, v in record.items() if k.startswith(prefix)})
    return values


def vqa_question_only_prior(root) -> float:
    """Val vqa-accuracy of answering each question text with its most frequent train answer, on the
    VQA demo materialised under ``root`` (a model that ignores the regions cannot beat it)."""
    return _vqa_prior_accuracy(root, lambda text: text)


def vqa_majority_answer(root) -> float:
    """Val vqa-accuracy of always answering the most frequent train answer (the VQA demo under ``root``)."""
    return _vqa_prior_accuracy(root, lambda text: "")


def _vqa_prior_accuracy(root, group_of) -> float:
    p = vqa_demo.paths(str(root))

    def pairs(split):
        questions = json.load(open(p["splits"][split]["questions"]))["questions"]
        anns = {a["question_id"]: a for a in json.load(open(p["splits"][split]["annotations"]))["annotations"]}
        return [(group_of(q["question"]), [a["answer"] for a in anns[q["question_id"]]["answers"]]) for q in questions]

    votes = defaultdict(Counter)
    for group, answers in pairs("train"):
        votes[group].update(answers)
    scores = []
    for group, answers in pairs("val"):
        guess = votes[group].most_common(1)[0][0] if group in votes else "yes"
        scores.append(min(1.0, answers.count(guess) / 3))
    return sum(scores) / len(scores)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a busy 2-core machine: one intra-op thread is much faster than two (OpenMP
    synchronisation). Test modules import this fixture to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
