"""build_config: composition order, includes, overrides, strictness, selection, files, saving."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from villa_plugin.common.errors import ConfigError
from villa_plugin.config.compose import build_config, save_config


@pytest.fixture
def two_datasets(bundle, h, tmp_path):
    """Model tst_model and datasets tst_d1, tst_d2, each with a defaults YAML."""
    h.register_model(
        "tst_model",
        h.write(
            tmp_path / "plug" / "model.yaml",
            """
            model_config:
              tst_model:
                hidden: 8
                layers: [1, 2, 3]
                dropout: 0.1
            training: {a: 1, b: 1, c: 1, d: 1}
            """,
        ),
    )
    h.register_builder(
        "tst_d1",
        h.write(
            tmp_path / "plug" / "d1.yaml",
            """
            dataset_config:
              tst_d1: {path: d1.lmdb, max_len: 20}
            training: {b: 2, c: 2, d: 2, name: d1}
            """,
        ),
    )
    h.register_builder(
        "tst_d2",
        h.write(
            tmp_path / "plug" / "d2.yaml",
            """
            dataset_config:
              tst_d2: {path: d2.lmdb}
            training: {name: d2}
            """,
        ),
    )
    return tmp_path


# -- composition order -------------------------------------------------------------------------
def test_merge_order_defaults_model_datasets_experiment_cli(two_datasets, h):
    exp = h.write(
        two_datasets / "exp.yaml",
        """
        model: tst_model
        datasets: [tst_d1, tst_d2]
        training: {c: 3, d: 3}
        model_config:
          tst_model: {layers: [7]}
        """,
    )
    config = build_config([f"config={exp}", "training.d=4"])
    assert [config.training[k] for k in "abcd"] == [1, 2, 3, 4]
    assert config.training.name == "d2"  # second dataset's YAML after the first's
    assert config.model_config.tst_model.layers == [7]  # lists are replaced, not merged
    assert config.model_config.tst_model.hidden == 8  # mappings merge
    assert config.dataset_config.tst_d1.path == "d1.lmdb"
    assert config.dataset_config.tst_d2.path == "d2.lmdb"
    assert config.model == "tst_model" and list(config.datasets) == ["tst_d1", "tst_d2"]


def test_only_selected_components_are_merged(two_datasets):
    config = build_config(["model=tst_model", "datasets=tst_d2"])
    assert "tst_d1" not in config.dataset_config
    assert config.training.b == 1  # tst_d1's YAML (b: 2) not merged
    assert config.training.name == "d2"


def test_defaults_alone_compose_with_interpolations(bundle):
    config = build_config(["training.max_updates=25"])
    assert config.training.steps == 25  # ${training.max_updates} sees the override
    assert config.model is None and list(config.datasets) == []


def test_real_bundled_defaults_compose():
    config = build_config(["training.max_updates=3", "optimizer.params.betas[1]=0.999"])
    assert config.training.max_updates == 3
    assert list(config.optimizer.params.betas)[1] == 0.999
    assert config.optimizer.enable_state_sharding is False
    assert OmegaConf.to_container(config, resolve=True)  # every interpolation resolves


def test_mmf_state_sharding_key_is_kept():
    config = build_config(["optimizer.enable_state_sharding=True"])
    assert config.optimizer.enable_state_sharding is True


# -- selection of model and datasets -----------------------------------------------------------
def test_experiment_yaml_names_model_datasets_and_trainer(two_datasets, h):
    exp = h.write(
        two_datasets / "exp.yaml",
        "model: tst_model\ndatasets: tst_d1,tst_d2\ntraining: {trainer: special}\n",
    )
    config = build_config([f"config={exp}"])
    assert config.model == "tst_model"
    assert list(config.datasets) == ["tst_d1", "tst_d2"]
    assert config.training.trainer == "special"
    assert config.model_config.tst_model.hidden == 8


def test_command_line_selection_beats_experiment_yaml(two_datasets, h):
    h.register_model(
        "tst_other", h.write(two_datasets / "plug" / "other.yaml", "model_config:\n  tst_other: {width: 3}\n")
    )
    exp = h.write(
        two_datasets / "exp.yaml",
        """
        model: tst_model
        datasets: [tst_d1]
        model_config:
          tst_model: {hidden: 99}
        """,
    )
    config = build_config([f"config={exp}", "model=tst_other", "dataset=tst_d2"])
    assert config.model == "tst_other" and list(config.datasets) == ["tst_d2"]
    assert config.model_config.tst_other.width == 3
    # the experiment's block for the registered-but-unselected model is dropped, not merged
    assert "tst_model" not in config.model_config
    assert "tst_d1" not in config.dataset_config


def test_component_without_yaml_gets_free_form_block(bundle, h):
    h.register_model("tst_bare")
    config = build_config(["model=tst_bare", "model_config.tst_bare.anything=5"])
    assert config.model_config.tst_bare.anything == 5


def test_component_yaml_without_its_block_is_an_error(bundle, h, tmp_path):
    h.register_model("tst_wrong", h.write(tmp_path / "w.yaml", "model_config:\n  other_name: {x: 1}\n"))
    with pytest.raises(ConfigError, match=r"model_config: \{tst_wrong: \.\.\.\}"):
        build_config(["model=tst_wrong"])


def test_missing_component_yaml_names_the_class(bundle, h, tmp_path):
    h.register_model("tst_gone", tmp_path / "gone.yaml")
    with pytest.raises(ConfigError, match=r'Defaults YAML of model "tst_gone" .*gone\.yaml'):
        build_config(["model=tst_gone"])


# -- includes ----------------------------------------------------------------------------------
def test_includes_relative_nested_in_order(bundle, h, tmp_path):
    h.write(tmp_path / "exp" / "common.yaml", "training: {a: 1, b: 1, c: 1}\n")
    h.write(tmp_path / "exp" / "base" / "b.yaml", "includes: [../common.yaml]\ntraining: {b: 2, c: 2}\n")
    exp = h.write(tmp_path / "exp" / "x.yaml", "includes: [base/b.yaml]\ntraining: {c: 3}\n")
    config = build_config([f"config={exp}"])
    assert [config.training[k] for k in "abc"] == [1, 2, 3]
    assert "includes" not in config  # consumed while loading


def test_include_falls_back_to_bundled_root(bundle, h, tmp_path):
    h.write(bundle / "projects" / "shared.yaml", "training: {name: shared}\n")
    exp = h.write(tmp_path / "elsewhere" / "x.yaml", "includes: [projects/shared.yaml]\n")
    assert build_config([f"config={exp}"]).training.name == "shared"


def test_include_cycle_names_the_chain(bundle, h, tmp_path):
    h.write(tmp_path / "a.yaml", "includes: [b.yaml]\n")
    h.write(tmp_path / "b.yaml", "includes: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        build_config([f"config={tmp_path / 'a.yaml'}"])
    message = str(info.value)
    assert message.index("a.yaml") < message.index("b.yaml") < message.rindex("a.yaml")


def test_missing_include_names_file_and_places(bundle, h, tmp_path):
    exp = h.write(tmp_path / "x.yaml", "includes: [nope.yaml]\n")
    with pytest.raises(ConfigError) as info:
        build_config([f"config={exp}"])
    message = str(info.value)
    assert "nope.yaml" in message and str(tmp_path / "nope.yaml") in message
    assert str(bundle / "nope.yaml") in message and str(exp) in message


def test_include_of_undeclared_key_names_the_included_file(bundle, h, tmp_path):
    inc = h.write(tmp_path / "inc.yaml", "training: {max_udpates: 3}\n")
    exp = h.write(tmp_path / "x.yaml", "includes: [inc.yaml]\n")
    with pytest.raises(ConfigError, match=f"training.max_udpates.*in {inc}"):
        build_config([f"config={exp}"])


# -- config= lookup and file errors ------------------------------------------------------------
def test_config_resolves_against_cwd_first(bundle, h, tmp_path, monkeypatch):
    h.write(tmp_path / "work" / "exp.yaml", "training: {name: cwd}\n")
    h.write(bundle / "exp.yaml", "training: {name: bundled}\n")
    monkeypatch.chdir(tmp_path / "work")
    assert build_config(["config=exp.yaml"]).training.name == "cwd"


def test_config_falls_back_to_bundled_root(bundle, h, tmp_path, monkeypatch):
    h.write(bundle / "projects" / "villa" / "tiny.yaml", "training: {name: bundled}\n")
    monkeypatch.chdir(tmp_path)
    assert build_config(["config=projects/villa/tiny.yaml"]).training.name == "bundled"


def test_missing_config_names_path_and_where_it_looked(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        build_config(["config=projects/none.yaml"])
    message = str(info.value)
    assert "projects/none.yaml" in message
    assert str(tmp_path / "projects" / "none.yaml") in message
    assert str(bundle / "projects" / "none.yaml") in message


def test_invalid_yaml_names_the_file(bundle, h, tmp_path):
    exp = h.write(tmp_path / "bad.yaml", "training: {a: 1\n")
    with pytest.raises(ConfigError, match=f"{exp}.*not valid YAML"):
        build_config([f"config={exp}"])


def test_top_level_list_is_rejected(bundle, h, tmp_path):
    exp = h.write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config([f"config={exp}"])


def test_unknown_yaml_tag_is_rejected(bundle, h, tmp_path):
    exp = h.write(tmp_path / "tag.yaml", "training: !!python/object:os.system {}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config([f"config={exp}"])


# -- command-line forms ------------------------------------------------------------------------
def test_command_line_forms(two_datasets):
    config = build_config(
        [
            "model=tst_model",
            "datasets=tst_d1,tst_d2",
            "run_type=train_inference",
            "training.seed",
            "7",  # the older `key value` form
            "training.betas[1]=0.999",
            "model_config.tst_model.layers=[4, 5]",
            "training.lr=1e-3",
            "training.fp16=true",
            "training.name=5",  # a str key keeps the text as typed
            "--training.max_updates=12",
        ]
    )
    assert config.training.seed == 7
    assert list(config.training.betas) == [0.9, 0.999]
    assert list(config.model_config.tst_model.layers) == [4, 5]
    assert config.training.lr == pytest.approx(1e-3)
    assert config.training.fp16 is True
    assert config.training.name == "5"
    assert config.training.max_updates == 12
    assert config.run_type == "train_inference"


def test_dataset_alias_and_later_arguments_win(two_datasets):
    config = build_config(["dataset=tst_d1", "model=tst_model", "training.a=5", "training.a=6"])
    assert list(config.datasets) == ["tst_d1"] and config.training.a == 6


def test_mapping_override_merges(bundle):
    config = build_config(["optimizer.lr_multipliers={head: 10}", "optimizer.lr_multipliers.emb=0.5"])
    assert OmegaConf.to_container(config.optimizer.lr_multipliers) == {"head": 10, "emb": 0.5}


def test_list_index_bounds_follow_experiment_list(bundle, h, tmp_path):
    exp = h.write(tmp_path / "x.yaml", "training: {betas: [1, 2, 3, 4]}\n")
    assert build_config([f"config={exp}", "training.betas[3]=9"]).training.betas[3] == 9
    with pytest.raises(ConfigError, match=r"index 2 is out of range, training.betas has 2"):
        build_config(["training.betas[2]=0.5"])


def test_option_without_value(bundle):
    with pytest.raises(ConfigError, match='"training.seed" has no value'):
        build_config(["training.seed"])


# -- strictness --------------------------------------------------------------------------------
def test_unknown_cli_key_suggests_closest(bundle):
    with pytest.raises(ConfigError) as info:
        build_config(["training.max_udpates=5"])
    message = str(info.value)
    assert '"training.max_udpates"' in message and "command line" in message
    assert 'Did you mean "training.max_updates"?' in message


def test_misplaced_key_suggests_full_path(bundle):
    with pytest.raises(ConfigError, match='Did you mean "training.max_updates"'):
        build_config(["max_updates=5"])


def test_unknown_yaml_key_names_file_and_suggestion(two_datasets, h):
    exp = h.write(two_datasets / "x.yaml", "model: tst_model\nmodel_config:\n  tst_model: {hiden: 3}\n")
    with pytest.raises(ConfigError) as info:
        build_config([f"config={exp}"])
    message = str(info.value)
    assert '"model_config.tst_model.hiden"' in message and str(exp) in message
    assert 'Did you mean "model_config.tst_model.hidden"?' in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.max_updates=abc", "must be an int"),
        ("training.max_updates=2.5", "must be an int"),
        ("training.max_updates=True", "must be an int"),
        ("training.fp16=1", "must be a bool"),
        ("training.lr=fast", "must be a number"),
        ("training.betas=0.5", "must be a list"),
        ("training=5", "must be a mapping"),
        ("training.seed.x=1", "training.seed is an int value, not a mapping"),
    ],
)
def test_wrong_types_are_rejected(bundle, override, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        build_config([override])
    assert override.split("=")[0].split(".x")[0] in str(info.value)


def test_wrong_type_in_yaml_names_file(bundle, h, tmp_path):
    exp = h.write(tmp_path / "x.yaml", "training: {fp16: 'no'}\n")
    with pytest.raises(ConfigError, match=f'"training.fp16" in {exp} must be a bool'):
        build_config([f"config={exp}"])


def test_accepted_type_widenings(bundle, h, tmp_path):
    exp = h.write(
        tmp_path / "x.yaml",
        """
        training:
          lr: 1               # int where float
          extra: {any: [thing]}  # null default accepts anything
          max_updates: ${training.seed}  # interpolation
        optimizer:
          lr_multipliers: {head: 10}   # free-form table
        """,
    )
    config = build_config([f"config={exp}"])
    assert config.training.lr == 1 and config.training.max_updates == 1
    assert config.training.extra.any == ["thing"]
    assert config.optimizer.lr_multipliers.head == 10


def test_all_problems_reported_together(bundle):
    with pytest.raises(ConfigError, match="2 problems") as info:
        build_config(["training.max_udpates=1", "training.fp16=3"])
    assert "max_udpates" in str(info.value) and "training.fp16" in str(info.value)


def test_unselected_model_block_on_cli_is_an_error(two_datasets):
    with pytest.raises(ConfigError, match=r"model_config.tst_model is not the selected model \(no model"):
        build_config(["model_config.tst_model.hidden=3"])


def test_unselected_unregistered_block_in_yaml_is_an_error_with_suggestion(two_datasets, h):
    exp = h.write(two_datasets / "x.yaml", "model: tst_model\nmodel_config:\n  tst_modle: {hidden: 3}\n")
    with pytest.raises(ConfigError) as info:
        build_config([f"config={exp}"])
    message = str(info.value)
    assert "model_config.tst_modle is not the selected model (model=tst_model)" in message
    assert 'Did you mean "tst_model"?' in message and str(exp) in message


def test_unselected_dataset_block_is_an_error(two_datasets):
    with pytest.raises(ConfigError, match=r"dataset_config.tst_d2 is not a selected dataset \(datasets=tst_d1\)"):
        build_config(["datasets=tst_d1", "dataset_config.tst_d2.path=x"])


def test_run_type_is_validated(bundle):
    for good in ("train", "val", "test", "train_val", "predict", "train_inference", "inference"):
        assert build_config([f"run_type={good}"]).run_type == good
    with pytest.raises(ConfigError, match='Invalid run_type "trian_val"'):
        build_config(["run_type=trian_val"])


def test_unresolvable_interpolation_names_the_key(bundle):
    with pytest.raises(ConfigError, match='"training.name" cannot be resolved'):
        build_config(["training.name=${nothing.here}"])


# -- saving ------------------------------------------------------------------------------------
def test_save_config_round_trip(two_datasets, h, tmp_path):
    exp = h.write(
        two_datasets / "exp.yaml",
        "model: tst_model\ndatasets: [tst_d1]\ntraining: {c: 3}\n",
    )
    first = build_config([f"config={exp}", "training.max_updates=42", "training.betas[0]=0.5"])
    path = save_config(first, tmp_path / "run")
    assert path == str(tmp_path / "run" / "config.yaml")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "${" not in text and "steps: 42" in text  # resolved
    second = build_config([f"config={path}"])
    assert OmegaConf.to_container(second, resolve=True) == OmegaConf.to_container(first, resolve=True)


def test_save_config_round_trip_with_real_defaults(tmp_path):
    first = build_config(["training.max_updates=7", "run_type=val"])
    second = build_config([f"config={save_config(first, tmp_path)}"])
    assert OmegaConf.to_container(second, resolve=True) == OmegaConf.to_container(first, resolve=True)


def test_mapping_name_used_as_key_suggests_the_leaf(bundle):
    # MMF silently ignores `trainer=villa`; here it is an error pointing at training.trainer
    with pytest.raises(ConfigError, match='Unknown config key "trainer".*Did you mean "training.trainer"'):
        build_config(["trainer=villa"])


def test_yaml_bool_for_a_str_key_keeps_its_text(bundle, h, tmp_path):
    """``training.progress_bar: false`` (configs/defaults.yaml documents auto | true | false) is accepted."""
    exp = h.write(tmp_path / "x.yaml", "training: {name: false}\n")
    assert build_config([f"config={exp}"]).training.name == "false"
    exp = h.write(tmp_path / "y.yaml", "training: {name: true}\n")
    assert build_config([f"config={exp}"]).training.name == "true"


def test_progress_bar_false_in_an_experiment_file(tmp_path):
    from villa_plugin.common.logger import progress_bar_enabled

    exp = tmp_path / "x.yaml"
    exp.write_text("includes: [projects/villa/demo.yaml]\ntraining:\n  progress_bar: false\n")
    config = build_config([f"config={exp}"])
    assert config.training.progress_bar == "false"
    assert not progress_bar_enabled(config.training.progress_bar, True)
