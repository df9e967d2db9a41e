"""`mmf_run config=projects/villa/demo.yaml`: the bundled VQA demo learns the cross-modal binding.

Both runs go through the real CLI, trainer, data materialisation and evaluation, on a shortened
schedule (300 of the demo's 1200 updates). The bar is the question-only prior, computed from the
generated files: the best answer per question text on train, scored on val. A model that ignores
the regions cannot beat it; after 300 updates the demo's model is ~0.18 above it (colour and shape
questions are answered from the regions, counting and "is there" come later in the full run).
"""
from __future__ import annotations

import json

import pytest
import torch

from demo_task_runner import vqa_question_only_prior as _question_only_prior
from villa_plugin import cli

SHORT_SCHEDULE = (
    "training.max_updates=300",
    "training.evaluation_interval=300",
    "training.checkpoint_interval=300",
    "training.log_interval=100",
    "training.num_threads=1",  # tiny ops on a busy 2-core machine: one intra-op thread is faster
    "training.tensorboard=false",
    "training.log_format=json",
)
ACCURACY = "val/vqa2/vqa_accuracy"
MARGIN = 0.1  # over the question-only prior


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One materialised demo for both runs."""
    return tmp_path_factory.mktemp("vqa_demo_cache")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run_demo(cache_dir, save_dir, monkeypatch, *extra):
    """Exit code and the JSON records of ``<save_dir>/train.log`` of one ``mmf_run`` of the demo."""
    monkeypatch.setenv("MMF_CACHE_DIR", str(cache_dir))
    code = cli.run(["config=projects/villa/demo.yaml", f"env.cache_dir={cache_dir}", f"env.save_dir={save_dir}",
                    *SHORT_SCHEDULE, *extra])
    with open(save_dir / "train.log", encoding="utf-8") as handle:
        records = [json.loads(line[line.index('{"update"'):]) for line in handle if '{"update"' in line]
    return code, records


def _final_accuracy(records):
    values = [r[ACCURACY] for r in records if ACCURACY in r]
    assert values, "the run logged no val accuracy"
    return values[-1]


def test_villa_demo_learns_beyond_the_question_only_prior(cache_dir, tmp_path, monkeypatch):
    code, records = _run_demo(cache_dir, tmp_path / "villa", monkeypatch)
    assert code == 0
    assert torch.get_num_threads() == 1  # training.num_threads was applied
    assert any("train/adv/kl" in r for r in records)  # the adversarial step really ran
    prior = _question_only_prior(cache_dir / "demo" / "vqa_v1")
    assert 0.3 < prior < 0.55
    assert _final_accuracy(records) >= prior + MARGIN


def test_plain_uniter_baseline_learns_too(cache_dir, tmp_path, monkeypatch):
    code, records = _run_demo(cache_dir, tmp_path / "uniter", monkeypatch, "model=uniter")
    assert code == 0
    assert not any("train/adv/kl" in r for r in records)
    assert _final_accuracy(records) >= _question_only_prior(cache_dir / "demo" / "vqa_v1") + MARGIN


def test_num_threads_must_be_a_positive_integer(tmp_path, capsys):
    code = cli.run(["config=projects/villa/demo.yaml", f"env.cache_dir={tmp_path}/cache",
                    f"env.save_dir={tmp_path}/save", "training.num_threads=0"])
    assert code == 1
    assert "training.num_threads must be a positive integer" in capsys.readouterr().err
