"""`mmf_run config=projects/villa/vqa.yaml` starts a real run on data in UNITER's released formats.

The test writes, under tmp_path, every file the config names (txt_dbs with lz4+msgpack records and
meta.json, img_db LMDBs with the nbb side file, ans2label.json) and an official-layout
`villa-base.pt`, then runs the unchanged experiment config with only the data dir, a tiny
architecture and a two-update schedule overridden.
"""
import json
import os

import numpy as np
import torch

from villa_plugin import cli
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import write_txt_db
from villa_plugin.models.registered import UNITER

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
NUM_ANSWERS = 3129
TXT_TO_IMG = {  # txt_db -> img_db, as in villa_plugin/tasks/vqa/defaults.yaml
    "vqa_train.db": "coco_train2014",
    "vqa_trainval.db": "coco_val2014",
    "vqa_vg.db": "vg",
    "vqa_devval.db": "coco_val2014",
    "vqa_test.db": "coco_test2015",
}


def _region_record(rng, n):
    xy = rng.uniform(0, 0.5, size=(n, 2))
    wh = rng.uniform(0.1, 0.5, size=(n, 2))
    return {
        "features": rng.uniform(0, 2, size=(n, 2048)).astype(np.float32),
        "norm_bb": np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32),
        "conf": rng.uniform(0.3, 1.0, size=(n, 1)).astype(np.float32),
    }


def _write_uniter_vqa_data(root, rng):
    meta = {"bert": "bert-base-cased", "CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [999, 28996]}
    img_keys = {}
    for img_db in sorted(set(TXT_TO_IMG.values())):
        keys = [f"{img_db}_{i:012d}.npz" for i in range(6)]
        write_img_db(os.path.join(root, "img_db", img_db), ((k, _region_record(rng, 12)) for k in keys))
        img_keys[img_db] = keys
    for txt_db, img_db in TXT_TO_IMG.items():
        examples = []
        for i in range(16):
            example = {"input_ids": rng.integers(1000, 5000, size=int(rng.integers(4, 12))).tolist(),
                       "img_fname": img_keys[img_db][i % 6]}
            if txt_db != "vqa_test.db":
                example["target"] = {"labels": [int(rng.integers(0, 4))], "scores": [1.0]}
            examples.append((f"{txt_db}-{i}", example))
        write_txt_db(os.path.join(root, "txt_db", txt_db), examples, meta)
    answers = {f"answer{i}": i for i in range(NUM_ANSWERS)}
    with open(os.path.join(root, "ans2label.json"), "w") as handle:
        json.dump(answers, handle)


def _write_official_checkpoint(path):
    """A villa-base.pt-style file: official key names (`uniter.*`) with recognisable weights."""
    config = {"uniter_config": "base", "architecture": dict(TINY), "head": "vqa", "num_labels": NUM_ANSWERS,
              "pretrained_checkpoint": "", "dropout": 0.1, "losses": [{"type": "logit_bce"}]}
    model = UNITER(config)
    model.build()
    state = {k: v for k, v in model.state_dict().items() if k.startswith("uniter.")}
    state["uniter.pooler.dense.bias"] = torch.full_like(state["uniter.pooler.dense.bias"], 0.125)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return state


def test_vqa_experiment_config_starts_a_real_run(tmp_path, caplog):
    data_dir = tmp_path / "data"
    _write_uniter_vqa_data(str(data_dir / "uniter"), np.random.default_rng(0))
    _write_official_checkpoint(str(data_dir / "pretrained" / "villa-base.pt"))
    save_dir = tmp_path / "save"
    argv = [
        "config=projects/villa/vqa.yaml",
        f"env.data_dir={data_dir}",
        f"env.save_dir={save_dir}",
        f"env.cache_dir={tmp_path / 'cache'}",
        *[f"model_config.villa.architecture.{k}={v}" for k, v in TINY.items()],
        "training.max_updates=2",
        "training.update_frequency=2",
        "training.batch_size_tokens=256",
        "evaluation.batch_size_tokens=512",
        "training.num_workers=0",
        "training.pin_memory=false",
        "training.precision=fp32",
        "training.evaluation_interval=2",
        "training.checkpoint_interval=2",
        "training.tensorboard=false",
        "scheduler.params.warmup_steps=1",
    ]
    caplog.set_level("INFO")
    assert cli.run(argv) == 0

    log = caplog.text
    assert "villa-base.pt (official layout)" in log and "0 missing" not in log  # head keys are missing
    assert "villa_free_at" in log and "adv_modality=('text',)" in log
    assert "val/vqa2/vqa_accuracy" in log
    saved = (save_dir / "config.yaml").read_text()
    assert "adv_kl_weight: 1.5" in saved and "batch_size_tokens: 256" in saved
    checkpoint = torch.load(save_dir / "current.ckpt", weights_only=True)
    assert checkpoint["counts"]["num_updates"] == 2
