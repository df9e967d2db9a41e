"""docs/own_data.md's walkthrough runs as written, end to end, on generated images: mmf_extract (grid,
random weights) -> convert vqa_txt_db -> mmf_run with 2 updates -> a predictions file.

The bash block's commands are dispatched to the same entry points the console scripts call; the test
only appends settings that make it small (a tiny UNITER, 2 updates, fp32, no workers, 64-px images).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from villa_plugin import cli as mmf_cli
from villa_plugin.datasets import convert
from villa_plugin.features import cli as extract_cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "own_data.md"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", "?", ".", "what", "color", "is", "the", "ball",
         "there", "a", "dog", "yes", "no", "red", "blue"]
ANSWERS = ["yes", "no", "red", "blue"]
TINY_RUN = ["training.max_updates=2", "training.batching=fixed", "training.batch_size=4", "training.update_frequency=1",
            "training.precision=fp32", "training.num_workers=0", "training.pin_memory=false",
            "training.tensorboard=false", "training.evaluation_interval=2", "training.checkpoint_interval=2",
            "training.log_interval=1", "training.num_threads=1", 'model_config.villa.pretrained_checkpoint=""',
            "model_config.villa.architecture.vocab_size=32", "model_config.villa.architecture.hidden_size=16",
            "model_config.villa.architecture.num_hidden_layers=1",
            "model_config.villa.architecture.num_attention_heads=2",
            "model_config.villa.architecture.intermediate_size=32"]
TINY_EXTRACT = ["--option", "image_size=64", "--num_workers", "0"]


def _blocks(lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _write_data(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    for image_id in range(1, 7):
        arr = (np.random.RandomState(image_id).rand(40 + image_id, 50, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "images" / f"{image_id}.jpg")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (root / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    texts = ["what color is the ball?", "is there a dog?"]
    qid = 0
    for split, image_ids in (("train", range(1, 7)), ("val", range(1, 4)), ("test", range(4, 7))):
        questions, anns = [], []
        for image_id in image_ids:
            for k, text in enumerate(texts):
                qid += 1
                questions.append({"question_id": qid, "image_id": image_id, "question": text})
                answer = ["red", "blue"][image_id % 2] if k == 0 else ["yes", "no"][image_id % 2]
                anns.append({"question_id": qid, "answers": [{"answer": answer}] * 10,
                             "answer_type": "other", "question_type": "what"})
        (root / f"questions_{split}.json").write_text(json.dumps({"data_subtype": split, "questions": questions}))
        if split != "test":
            (root / f"annotations_{split}.json").write_text(json.dumps({"annotations": anns}))


def _commands(data: Path):
    (script,) = [b for b in _blocks("bash") if "DATA=my_data" in b]
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("DATA="):
            continue
        yield shlex.split(line.replace("$DATA", str(data)))


def test_own_data_walkthrough_end_to_end(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    data = tmp_path / "my_data"
    _write_data(data)
    (yaml_block,) = [b for b in _blocks("yaml") if "includes: [projects/villa/vqa.yaml]" in b]
    (data / "my_vqa.yaml").write_text(yaml_block.replace("3129", str(len(ANSWERS))))
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    ran = []
    try:
        for argv in _commands(data):
            if argv[0] == "mmf_extract":
                assert extract_cli.main(argv[1:] + TINY_EXTRACT) == 0
            elif argv[:3] == ["python", "-m", "villa_plugin.datasets.convert"]:
                assert convert.main(argv[3:]) == 0
            elif argv[0] == "mmf_run":
                assert mmf_cli.run(argv[1:] + TINY_RUN) == 0
            else:
                raise AssertionError(f"unexpected command in docs/own_data.md: {argv}")
            ran.append(argv[0])
    finally:
        torch.set_num_threads(threads)
    assert ran == ["mmf_extract", "python", "python", "python", "mmf_run", "mmf_run"]
    report = json.loads((data / "img_db" / "mine" / "extract_report.json").read_text())
    assert report["extracted"] == 6
    predictions = json.loads((data / "save" / "predictions" / "vqa2_test.json").read_text())
    assert sorted(p["question_id"] for p in predictions) == list(range(19, 25))
    assert all(p["answer"] in ANSWERS for p in predictions)
    log = (data / "save" / "train.log").read_text()
    assert "update 2" in log or '"update": 2' in log
