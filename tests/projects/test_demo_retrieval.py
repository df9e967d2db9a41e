"""`mmf_run config=projects/villa/demo_retrieval.yaml`: the bundled retrieval demo trains with the real
trainer (VILLA on, hard negatives mined after the warm-up) and learns; prediction writes the ranked
lists; the unchanged Flickr30k experiment config starts on data in UNITER's formats."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from villa_plugin import cli
import villa_plugin.tasks.retrieval.demo as demo
from villa_plugin.datasets.features import ImgFeatDB, write_img_db
from villa_plugin.datasets.task_common import img_db_settings
from villa_plugin.datasets.text import TxtDB, write_txt_db

from villa_plugin.models.registered import UNITER
from demo_task_runner import one_torch_thread  # noqa: F401  (autouse fixture)

CHANCE_R1 = 1 / demo.SPLITS["val"]



def _evaluations(out: str):
    return [json.loads(line[line.index('{"update"'):]) for line in out.splitlines() if '{"update"' in line]


def test_demo_files_are_in_the_real_formats(tmp_path):
    p = demo.materialise_demo(str(tmp_path / "retrieval_v2"))
    data = json.load(open(p["karpathy_json"]))
    splits = [img["split"] for img in data["images"]]
    assert {s: splits.count(s) for s in demo.SPLITS} == demo.SPLITS
    named = lambda text: tuple(w for w in text.split() if w in demo.SHAPES + demo.COLORS)  # noqa: E731
    combos = [named(img["sentences"][0]["raw"]) for img in data["images"] if img["split"] == "train"]
    assert all(len(c) == 2 for c in combos) and len(set(combos)) == len(combos)  # no two train images alike
    val_db = TxtDB(p["txt_db"]["val"])
    first = val_db[val_db.ids[0]]
    assert first["img_fname"] == demo.IMG_KEY_FORMAT.format(stem=str(first["sentid"] // demo.CAPTIONS_PER_IMAGE + 1))
    assert len(val_db.ids) == demo.SPLITS["val"] * demo.CAPTIONS_PER_IMAGE
    db = ImgFeatDB(p["img_db"], **img_db_settings(p))
    feat, pos = db[first["img_fname"]]
    assert feat.shape[1] == 2048 and pos.shape[1] == 7
    assert demo.materialise_demo(str(tmp_path / "retrieval_v2")) == p  # idempotent


def test_demo_trains_with_villa_and_learns(tmp_path, capsys):
    save, cache = tmp_path / "save", tmp_path / "cache"
    common = [f"env.save_dir={save}", f"env.cache_dir={cache}", "training.device=cpu", "training.log_format=json"]
    start = time.perf_counter()
    assert cli.run(["config=projects/villa/demo_retrieval.yaml", *common]) == 0
    seconds = time.perf_counter() - start
    evals = [e for e in _evaluations(capsys.readouterr().out) if "val/retrieval/r_mean" in e]
    final = evals[-1]
    print(f"retrieval demo: {final} in {seconds:.1f} s")
    assert final["val/retrieval/ir_r1"] > 6 * CHANCE_R1 and final["val/retrieval/r_mean"] > 0.5
    # run_type=predict on the test split: ranked lists in the documented JSON format
    out = tmp_path / "pred" / "{dataset}_{split}.json"
    assert cli.run(["config=projects/villa/demo_retrieval.yaml", *common, "run_type=predict",
                    f"checkpoint.resume_file={save}/best.ckpt", f"evaluation.predict_file={out}"]) == 0
    pred = json.load(open(tmp_path / "pred" / "retrieval_test.json"))
    assert pred["format"] == "villa_plugin.retrieval/v1" and pred["split"] == "test"
    assert len(pred["text_to_image"]) == demo.SPLITS["test"] * demo.CAPTIONS_PER_IMAGE
    assert pred["metrics"]["ir_r1"] > 4 * CHANCE_R1


# -- the unchanged experiment config on UNITER-format data ---------------------------------------
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
META = {"bert": "bert-base-cased", "CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [999, 28996]}


def _write_flickr(root, rng):
    keys = [f"flickr30k_{i:012d}.npz" for i in range(8)]
    records = []
    for key in keys:
        n = int(rng.integers(10, 14))
        xy, wh = rng.uniform(0, 0.5, (n, 2)), rng.uniform(0.1, 0.5, (n, 2))
        records.append((key, {"features": rng.uniform(0, 2, (n, 2048)).astype(np.float32),
                              "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float32),
                              "conf": rng.uniform(0.3, 1.0, (n, 1)).astype(np.float32)}))
    write_img_db(os.path.join(root, "img_db", "flickr30k"), records)
    for split, images in (("train", keys[:6]), ("val", keys[6:]), ("test", keys[6:])):
        examples = [(f"{split}{i}_{c}", {"input_ids": rng.integers(1000, 5000, size=int(rng.integers(4, 12))).tolist(),
                                         "img_fname": key}) for i, key in enumerate(images) for c in range(2)]
        write_txt_db(os.path.join(root, "txt_db", f"itm_flickr30k_{split}.db"), examples, META)


def test_flickr30k_experiment_config_starts_on_uniter_format_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    _write_flickr(str(data / "uniter"), rng)
    torch.manual_seed(0)
    donor = UNITER({"uniter_config": "base", "architecture": dict(TINY), "head": "itm", "num_labels": 1})
    donor.build()
    itm_w = torch.randn(2, TINY["hidden_size"])
    state = {k.replace("uniter.", "bert.", 1): v for k, v in donor.state_dict().items() if k.startswith("uniter.")}
    state.update({"itm_output.weight": itm_w, "itm_output.bias": torch.zeros(2)})  # as in villa-base.pt
    os.makedirs(data / "pretrained")
    torch.save(state, data / "pretrained" / "villa-base.pt")
    arch = [f"model_config.villa.architecture.{k}={v}" for k, v in TINY.items()]
    assert cli.run([
        "config=projects/villa/retrieval_flickr30k.yaml", f"env.data_dir={data}", f"env.save_dir={tmp_path / 'save'}",
        "training.device=cpu", "training.max_updates=2", "training.num_workers=0", "training.batch_size=2",
        "training.evaluation_interval=2", "training.log_format=json", "dataset_config.retrieval.negative_size=4",
        "dataset_config.retrieval.hard_neg_size=2", "evaluation.batch_size=16", "run_type=train_val", *arch,
    ]) == 0
    out = capsys.readouterr()
    evals = [e for e in _evaluations(out.out) if "val/retrieval/r_mean" in e]
    # 2 val images x 2 captions: every R@5 / R@10 is 1, R@1 counts whole queries, so
    # r_mean = (2 tr_r1 + ir_r1 + 16) / 24 with tr_r1 over 2 image queries and ir_r1 over 4 captions
    r_mean = evals[-1]["val/retrieval/r_mean"] * 24
    assert evals and r_mean >= 16 - 1e-6 and r_mean == pytest.approx(round(r_mean))
    assert "rank_output initialised from itm_output row 1" in out.out + out.err
