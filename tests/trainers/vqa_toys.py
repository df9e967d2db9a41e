"""A tiny real ``vqa2`` run for trainer tests: VQA JSON, a WordPiece vocab, an img_db (all under
tmp_path) and a composed config of a tiny UNITER / VILLA on them."""
import json

from datasets_testlib import region_record, write_vqa_json
from villa_plugin.common.device import set_seed
from villa_plugin.config.compose import build_config
from villa_plugin.datasets.features import write_img_db

TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", "?", "what", "color", "is", "the", "dog", "a", "there"]
ANSWERS = ["yes", "no", "red"]


def _record(i, feature_dim, feature_scale):
    record = region_record(10, [0.9] * 10, seed=i, dim=feature_dim)
    record["features"] = record["features"] * feature_scale
    return record


def write_data(root, feature_dim=2048, vocab_tokens=TOKENS, feature_scale=1.0):
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab_tokens) + "\n")
    (root / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    write_img_db(str(root / "img_db"), [(f"{i}.npz", _record(i, feature_dim, feature_scale)) for i in range(1, 4)])
    questions = [{"question_id": i, "image_id": 1 + i % 3, "question": "what color is the dog?"} for i in range(8)]
    answers = [{"question_id": i, "answers": [{"answer": ANSWERS[i % 3]}] * 10} for i in range(8)]
    return write_vqa_json(str(root), "train", questions, answers)


def tiny_uniter_args(model: str) -> list:
    """A 1-layer, 16-wide UNITER with 16 words and 3 labels under ``model_config.<model>``."""
    return [f"model_config.{model}.architecture.vocab_size=16", f"model_config.{model}.architecture.hidden_size=16",
            f"model_config.{model}.architecture.num_hidden_layers=1", f"model_config.{model}.architecture.num_attention_heads=2",
            f"model_config.{model}.architecture.intermediate_size=32", f"model_config.{model}.num_labels=3"]


def vqa_config(tmp_path, *overrides, model="uniter", model_args=None, **data):
    """The composed config of a 2-update run of ``model`` on data written by :func:`write_data`
    (``model_args``: the model's size settings, a tiny UNITER by default)."""
    q, a = write_data(tmp_path, **data)
    config = build_config([
        f"model={model}", "dataset=vqa2", "run_type=train", f"env.save_dir={tmp_path / 'save'}",
        "dataset_config.vqa2.source=vqa_json", f"dataset_config.vqa2.data_dir={tmp_path}",
        "dataset_config.vqa2.vocab=vocab.txt", "dataset_config.vqa2.ans2label=ans2label.json",
        f"dataset_config.vqa2.questions.train=[{q}]", f"dataset_config.vqa2.annotations.train=[{a}]",
        "dataset_config.vqa2.img_db.train=[img_db]", 'dataset_config.vqa2.img_key_format="{image_id}.npz"',
        *(tiny_uniter_args(model) if model_args is None else model_args),
        "training.max_updates=2", "training.batching=fixed", "training.batch_size=4", "training.num_workers=0",
        "training.pin_memory=false", "training.precision=fp32", "training.tensorboard=false",
        "training.evaluation_interval=0", "training.checkpoint_interval=0", "training.early_stop.criteria=",
        *overrides,
    ], load_plugins=False)
    set_seed(1)
    return config


