"""The set-up check of a dataset's sizes against the model's: each mismatch names both settings."""
import pytest

from villa_plugin.common.errors import ConfigError
from villa_plugin.common.input_spec import InputSpec, Size, check_model_fits_data

MODEL = InputSpec(
    vocab_size=Size(28996, "model_config.villa.architecture.vocab_size"),
    label_width=Size(3129, "model_config.villa.num_labels"),
    feature_dim=Size(2048, "model_config.villa.img_dim"),
)


def test_fitting_or_unknown_sizes_pass():
    check_model_fits_data(MODEL, InputSpec(vocab_size=Size(28996, "v.txt"), label_width=Size(3129, "k"),
                                           feature_dim=Size(2048, "img_db x")), "vqa2 (train)")
    check_model_fits_data(MODEL, InputSpec(vocab_size=Size(100, "small vocab")), "vqa2 (train)")  # a smaller vocab fits
    check_model_fits_data(InputSpec(), InputSpec(vocab_size=Size(10**6, "huge")), "x")  # the model declares nothing
    check_model_fits_data(MODEL, InputSpec(), "x")  # the dataset declares nothing


def test_a_larger_vocabulary_names_both_settings():
    data = InputSpec(vocab_size=Size(30522, "dataset_config.vqa2.vocab", "/data/uncased/vocab.txt"))
    with pytest.raises(ConfigError) as err:
        check_model_fits_data(MODEL, data, "vqa2 (train)")
    text = str(err.value)
    assert "vqa2 (train): the token ids reach 30521 (dataset_config.vqa2.vocab (/data/uncased/vocab.txt))" in text
    assert "model_config.villa.architecture.vocab_size = 28996" in text
    assert "set model_config.villa.architecture.vocab_size to your vocabulary's size (at least 30522)" in text


def test_label_and_target_widths_must_be_equal():
    for width in (10, 4000):
        data = InputSpec(label_width=Size(width, "dataset_config.vqa2.num_answers", "null: the answers of ans2label.json"))
        with pytest.raises(ConfigError, match=(
                rf"scores 3129 labels \(model_config.villa.num_labels\) but the targets have {width} "
                rf"\(dataset_config.vqa2.num_answers \(null: the answers of ans2label.json\)\).*"
                rf"Set model_config.villa.num_labels={width}, or dataset_config.vqa2.num_answers=3129")):
            check_model_fits_data(MODEL, data, "vqa2 (val)")


def test_feature_width_must_equal_img_dim():
    with pytest.raises(ConfigError, match=r"1024-d \(img_db /d/mine\) but the model takes 2048-d features "
                                          r"\(model_config.villa.img_dim\). Set model_config.villa.img_dim=1024"):
        check_model_fits_data(MODEL, InputSpec(feature_dim=Size(1024, "img_db /d/mine")), "vqa2 (train)")
