"""The trainer checks at set-up that the datasets fit the model (issue 11 "Also" 3, 4, 7): a vocabulary
larger than ``architecture.vocab_size``, ``num_labels`` != ``num_answers`` and features of another width
than ``img_dim`` are ConfigErrors naming both settings, not an IndexError / ValueError / shape error at
the first forward or mid-run. Real ``vqa2`` data (VQA JSON, a WordPiece vocab, an img_db) and a tiny UNITER."""
import pytest

from villa_plugin.common.errors import ConfigError
from villa_plugin.trainers.base_trainer import MMFTrainer
from villa_plugin.trainers.runtime import RunPlan
from vqa_toys import TOKENS, vqa_config


def _trainer(tmp_path, *overrides, **data):
    return MMFTrainer(vqa_config(tmp_path, *overrides, **data))


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


LXMERT_TINY = ["model_config.lxmert.architecture.hidden_size=16", "model_config.lxmert.architecture.num_attention_heads=2",
               "model_config.lxmert.architecture.intermediate_size=32", "model_config.lxmert.architecture.l_layers=1",
               "model_config.lxmert.architecture.r_layers=1", "model_config.lxmert.architecture.x_layers=1",
               "model_config.lxmert.architecture.vocab_size=16", "model_config.lxmert.num_labels=3"]


def _lxmert_trainer(tmp_path, *overrides, **data):
    return MMFTrainer(vqa_config(tmp_path, *overrides, model="lxmert", model_args=LXMERT_TINY, **data))


def test_lxmert_declares_its_sizes_too(tmp_path):
    with pytest.raises(ConfigError, match=r"scores 5 labels \(model_config.lxmert.num_labels\) but the targets have 3"):
        _lxmert_trainer(tmp_path / "labels", "model_config.lxmert.num_labels=5").setup(RunPlan.parse("train"))
    with pytest.raises(ConfigError, match=r"64-d .* but the model takes 2048-d features \(model_config.lxmert.architecture.visual_feat_dim\)"):
        _lxmert_trainer(tmp_path / "width", feature_dim=64).setup(RunPlan.parse("train"))
    bigger = [t for t in TOKENS if t != "dog"] + [f"word{i}" for i in range(10)] + ["dog"]
    with pytest.raises(ConfigError, match=r"model_config.lxmert.architecture.vocab_size = 16"):
        _lxmert_trainer(tmp_path / "vocab", vocab_tokens=bigger).setup(RunPlan.parse("train"))
    trainer = _lxmert_trainer(tmp_path / "fits")
    trainer.run()
    assert trainer.num_updates == 2
