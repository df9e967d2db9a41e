"""The trainer checks at set-up that the datasets fit the model (issue 11 "Also" 3, 4, 7): a vocabulary
larger than ``architecture.vocab_size``, ``num_labels`` != ``num_answers`` and features of another width
than ``img_dim`` are ConfigErrors naming both settings, not an IndexError / ValueError / shape error at
the first forward or mid-run. Real ``vqa2`` data (VQA JSON, a WordPiece vocab, an img_db) and a tiny UNITER."""
import json

import pytest

from datasets_testlib import region_record, write_vqa_json
from villa_plugin.common.device import set_seed
from villa_plugin.common.errors import ConfigError
from villa_plugin.config.compose import build_config
from villa_plugin.datasets.features import write_img_db
from villa_plugin.trainers.base_trainer import MMFTrainer
from villa_plugin.trainers.runtime import RunPlan

TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", "?", "what", "color", "is", "the", "dog", "a", "there"]
ANSWERS = ["yes", "no", "red"]


def _data(root, feature_dim=2048, vocab_tokens=TOKENS):
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab_tokens) + "\n")
    (root / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    write_img_db(str(root / "img_db"), [(f"{i}.npz", region_record(10, [0.9] * 10, seed=i, dim=feature_dim))
                                        for i in range(1, 4)])
    questions = [{"question_id": i, "image_id": 1 + i % 3, "question": "what color is the dog?"} for i in range(8)]
    answers = [{"question_id": i, "answers": [{"answer": ANSWERS[i % 3]}] * 10} for i in range(8)]
    return write_vqa_json(str(root), "train", questions, answers)


def _trainer(tmp_path, *overrides, **data):
    q, a = _data(tmp_path, **data)
    config = build_config([
        "model=uniter", "dataset=vqa2", "run_type=train", f"env.save_dir={tmp_path / 'save'}",
        "dataset_config.vqa2.source=vqa_json", f"dataset_config.vqa2.data_dir={tmp_path}",
        "dataset_config.vqa2.vocab=vocab.txt", "dataset_config.vqa2.ans2label=ans2label.json",
        f"dataset_config.vqa2.questions.train=[{q}]", f"dataset_config.vqa2.annotations.train=[{a}]",
        "dataset_config.vqa2.img_db.train=[img_db]", 'dataset_config.vqa2.img_key_format="{image_id}.npz"',
        "model_config.uniter.architecture.vocab_size=16", "model_config.uniter.architecture.hidden_size=16",
        "model_config.uniter.architecture.num_hidden_layers=1", "model_config.uniter.architecture.num_attention_heads=2",
        "model_config.uniter.architecture.intermediate_size=32", "model_config.uniter.num_labels=3",
        "training.max_updates=2", "training.batching=fixed", "training.batch_size=4", "training.num_workers=0",
        "training.pin_memory=false", "training.precision=fp32", "training.tensorboard=false",
        "training.evaluation_interval=0", "training.checkpoint_interval=0", "training.early_stop.criteria=",
        *overrides,
    ], load_plugins=False)
    set_seed(1)
    return MMFTrainer(config)


def test_fitting_data_trains_with_another_feature_width(tmp_path):
    trainer = _trainer(tmp_path, "model_config.uniter.img_dim=64", feature_dim=64)  # num_answers null: 3 answers
    trainer.run()
    assert trainer.num_updates == 2
    assert trainer.raw_model.uniter.img_embeddings.img_linear.in_features == 64


def test_a_vocabulary_larger_than_vocab_size_is_a_config_error(tmp_path):
    # "dog" moves to id 23 >= vocab_size 16 (24 tokens): a raw IndexError at the first forward before this check
    bigger = [t for t in TOKENS if t != "dog"] + [f"word{i}" for i in range(10)] + ["dog"]
    with pytest.raises(ConfigError) as err:
        _trainer(tmp_path, vocab_tokens=bigger).setup(RunPlan.parse("train"))
    text = str(err.value)
    assert f"the token ids reach 23 (dataset_config.vqa2.vocab ({tmp_path / 'vocab.txt'}, 24 tokens; the highest id used is 23))" in text
    assert "model_config.uniter.architecture.vocab_size = 16" in text
    assert "set model_config.uniter.architecture.vocab_size to your vocabulary's size (at least 24)" in text


def test_unused_vocabulary_ids_beyond_vocab_size_are_not_an_error(tmp_path):
    trainer = _trainer(tmp_path, vocab_tokens=TOKENS + [f"word{i}" for i in range(10)])  # ids 12..23 unused
    trainer.setup(RunPlan.parse("train"))
    assert trainer.datasets["train"]["vqa2"].input_spec.vocab_size.value == 12  # "dog" (11) is the highest id used


def test_num_labels_and_num_answers_must_agree(tmp_path):
    with pytest.raises(ConfigError, match=r"scores 5 labels \(model_config.uniter.num_labels\) but the targets have 3 "
                                          r"\(dataset_config.vqa2.num_answers \(null: the answers of ans2label.json\)\)"):
        _trainer(tmp_path, "model_config.uniter.num_labels=5").setup(RunPlan.parse("train"))
    with pytest.raises(ConfigError, match=r"scores 3 labels .* targets have 4 \(dataset_config.vqa2.num_answers\);.*"
                                          r"Set model_config.uniter.num_labels=4, or dataset_config.vqa2.num_answers=3"):
        _trainer(tmp_path / "padded", "dataset_config.vqa2.num_answers=4").setup(RunPlan.parse("train"))


def test_features_of_another_width_than_img_dim_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=rf"64-d \(img_db {tmp_path / 'img_db'}\) but the model takes 2048-d "
                                          r"features \(model_config.uniter.img_dim\)\. Set model_config.uniter.img_dim=64"):
        _trainer(tmp_path, feature_dim=64).setup(RunPlan.parse("train"))
