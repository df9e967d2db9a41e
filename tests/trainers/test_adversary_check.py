"""``adversary_check`` (issue 11 "Also" 6): with step sizes far below the scale of the features and
embeddings, the symmetric KL stays ~0 and villa_free_at warns once, with the measured KL and δ's
norm relative to its input; step sizes that move the predictions give no warning."""
import math

import pytest
import torch

from villa_plugin.common.errors import ConfigError
from villa_plugin.trainers.adversary_check import AdversaryCheckCallback, max_prediction_shift
from villa_plugin.trainers.villa_free_at import VillaFreeATTrainer
from vqa_toys import vqa_config

ADV = ["training.adversary_check.updates=2", "training.max_updates=3"]
IMAGE = "model_config.villa.adversarial.adv_modality=[image]"


def _run(tmp_path, caplog, *overrides, **data):
    trainer = VillaFreeATTrainer(vqa_config(tmp_path, *ADV, *overrides, model="villa", **data))
    with caplog.at_level("INFO", logger="villa_plugin"):
        trainer.run()
    check = trainer.callbacks.find(AdversaryCheckCallback)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "adversary" in r.getMessage()]
    return trainer, check, warnings


def test_features_of_another_scale_warn_once_with_kl_and_ratio(tmp_path, caplog):
    # BUTD-like features x1e4: the default step (1e-3) is ~1e-10 of the region features. Without
    # dropout, the KL of step 0 (δ_0 = 0) is exactly 0 and the gain is the adversary's KL itself.
    trainer, check, warnings = _run(tmp_path, caplog, IMAGE, "model_config.villa.dropout=0.0", feature_scale=1e4)
    assert trainer.num_updates == 3 and len(warnings) == 1 and check.warning == warnings[0]
    text = warnings[0]
    assert "over the first 2 updates the ascent added" in text and "(train/adv/kl_gain; train/adv/kl" in text
    assert "below training.adversary_check.min_kl=0.0004" in text
    gain = float(text.split("the ascent added ")[1].split(" ")[0])
    assert abs(gain) < 1e-8
    assert "model_config.villa.adversarial.adv_lr_img=0.001: δ's norm is" in text and "of the region features' norm" in text
    assert 'docs/villa.md, "Choosing adv_lr_* for new features"' in text
    image_ratio = float(text.split("δ's norm is ")[1].split(" ")[0])
    assert 0 < image_ratio < 1e-8  # ‖δ‖ <= 2e-3 against features of norm ~1e6


def test_steps_that_move_the_predictions_do_not_warn(tmp_path, caplog):
    _, check, warnings = _run(tmp_path, caplog, "model_config.villa.adversarial.adv_modality=[image,text]",
                              "model_config.villa.adversarial.adv_lr_txt=0.3", "model_config.villa.adversarial.adv_lr_img=3")
    assert warnings == [] and check.done and check.warning is None


def test_the_check_can_be_turned_off_and_is_validated(tmp_path, caplog):
    _, check, warnings = _run(tmp_path, caplog, IMAGE, "training.adversary_check.updates=0", feature_scale=1e4)
    assert warnings == [] and check.done
    with pytest.raises(ConfigError, match="adversary_check"):
        VillaFreeATTrainer(vqa_config(tmp_path / "b", *ADV, "training.adversary_check.min_kl=-1", model="villa")).run()


def test_threshold_is_pinskers_bound():
    assert max_prediction_shift(4e-4) == pytest.approx(0.01)  # the default min_kl: at most 1% of the mass
    assert max_prediction_shift(1e-4) == pytest.approx(0.005) and max_prediction_shift(-1.0) == 0.0
    assert math.isclose(max_prediction_shift(4e-6), 1e-3)


def test_standard_error_of_the_gain():
    from villa_plugin.trainers.adversary_check import standard_error

    values = [1e-4, 3e-4, 2e-4, 6e-4]
    mean, squares = sum(values) / 4, sum(v * v for v in values) / 4
    assert standard_error(mean, squares, 4) == pytest.approx(float(torch.tensor(values).std()) / 2, rel=1e-5)
    assert standard_error(mean, None, 4) == 0.0 and standard_error(mean, squares, 1) == 0.0


LXMERT_TINY = ["model_config.lxmert.architecture.hidden_size=16", "model_config.lxmert.architecture.num_attention_heads=2",
               "model_config.lxmert.architecture.intermediate_size=32", "model_config.lxmert.architecture.l_layers=1",
               "model_config.lxmert.architecture.r_layers=1", "model_config.lxmert.architecture.x_layers=1",
               "model_config.lxmert.architecture.vocab_size=16", "model_config.lxmert.head=lxmert_vqa",
               "model_config.lxmert.num_labels=3", "model_config.lxmert.dropout=0.0"]


def test_lxmert_reports_its_input_norms_so_the_check_gives_the_ratios(tmp_path, caplog):
    # LXMERT returns perturbed_input_norms as UNITER does: the warning names δ's size against both inputs
    config = vqa_config(tmp_path, *ADV, "model_config.lxmert.adversarial.adv_training=true",
                        "model_config.lxmert.adversarial.adv_modality=[image,text]",
                        model="lxmert", model_args=LXMERT_TINY, feature_scale=1e4)
    trainer = VillaFreeATTrainer(config)
    with caplog.at_level("INFO", logger="villa_plugin"):
        trainer.run()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "adversary" in r.getMessage()]
    assert len(warnings) == 1
    text = warnings[0]
    assert "model_config.lxmert.adversarial.adv_lr_img=0.001: δ's norm is" in text and "of the region features' norm" in text
    assert "model_config.lxmert.adversarial.adv_lr_txt=0.001: δ's norm is" in text and "of the word embeddings' norm" in text
    image_ratio = float(text.split("adv_lr_img=0.001: δ's norm is ")[1].split(" ")[0])
    assert 0 < image_ratio < 1e-8  # ‖δ‖ <= 2e-3 against features of norm ~1e6

    model, batch = trainer.raw_model, next(iter(trainer.train_loader))
    model.eval()
    shapes = model.perturbation_shapes(batch)
    with torch.no_grad():
        output = model(batch, perturbation={m: torch.zeros(shapes[m]) for m in ("text", "image")})
        words = model.lxmert.embeddings.word_embeddings(batch["input_ids"])
    norms = output["perturbed_input_norms"]
    assert torch.allclose(norms["text"], words.flatten(1).norm(dim=1))
    assert torch.allclose(norms["image"], batch["img_feat"].flatten(1).norm(dim=1))
    with torch.no_grad():
        assert "perturbed_input_norms" not in model(batch)
