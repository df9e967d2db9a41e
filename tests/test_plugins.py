"""Plugin discovery: env.user_dir / MMF_USER_DIR, entry points, and an end-to-end external plugin.

The end-to-end tests run ``python -m villa_plugin.cli`` on a plugin package written under tmp_path
(its own model ``myteam_mlp``, builder ``myteam_numbers`` and their defaults YAML) with the core
``mmf`` trainer.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from villa_plugin import plugins
from villa_plugin.common.errors import UserError
from villa_plugin.config.compose import build_config
from villa_plugin.registry import registry

TRAINER = "mmf"

# -- a small external plugin package, written by the tests ---------------------------------------
PLUGIN_FILES = {
    "__init__.py": """
        from . import model, numbers  # noqa: F401  (imports register)
    """,
    "trace.py": """
        import os


        def trace(event):
            path = os.environ.get("MYTEAM_TRACE")
            if path:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(event + "\\n")
    """,
    "model.py": """
        import os

        from torch import nn

        from villa_plugin.models.base_model import BaseModel
        from villa_plugin.registry import registry

        from .trace import trace


        @registry.register_model("MODEL_NAME")
        class MyTeamMLP(BaseModel):
            @classmethod
            def config_path(cls):
                return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "model.yaml")

            def build(self):
                c = self.config
                self.net = nn.Sequential(
                    nn.Linear(c.in_dim, c.hidden), nn.ReLU(), nn.Linear(c.hidden, c.num_labels)
                )
                trace(f"build_model hidden={c.hidden}")

            def forward(self, sample_list, perturbation=None):
                scores = self.net(sample_list["x"])
                output = {"scores": scores}
                if sample_list.get("targets") is not None:
                    key = f"{sample_list['dataset_type']}/{sample_list['dataset_name']}/cross_entropy"
                    output["losses"] = {key: nn.functional.cross_entropy(scores, sample_list["targets"])}
                trace("forward")
                return output
    """,
    "numbers.py": """
        import os

        import torch

        from villa_plugin.common.sample_list import SampleList
        from villa_plugin.datasets.base import BaseDataset, BaseDatasetBuilder
        from villa_plugin.registry import registry

        from .trace import trace


        class NumbersDataset(BaseDataset):
            def __init__(self, name, split, config):
                super().__init__(name, split, config)
                generator = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
                self.x = torch.randn(config.num_examples, config.in_dim, generator=generator)
                self.y = (self.x.sum(dim=1) > 0).long()

            def __len__(self):
                return len(self.y)

            def __getitem__(self, index):
                return {"x": self.x[index], "targets": self.y[index]}

            def lengths(self):
                return [1] * len(self)

            def collate(self, examples):
                return SampleList(
                    x=torch.stack([e["x"] for e in examples]),
                    targets=torch.stack([e["targets"] for e in examples]),
                    dataset_name=self.dataset_name,
                    dataset_type=self.dataset_type,
                )


        @registry.register_builder("BUILDER_NAME")
        class NumbersBuilder(BaseDatasetBuilder):
            @classmethod
            def config_path(cls):
                return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "numbers.yaml")

            def build_dataset(self, split):
                trace(f"build_dataset {split} n={self.config.num_examples}")
                return NumbersDataset(self.dataset_name, split, self.config)
    """,
    "configs/model.yaml": """
        model_config:
          MODEL_NAME:
            in_dim: 4
            hidden: 16
            num_labels: 2
    """,
    "configs/numbers.yaml": """
        dataset_config:
          BUILDER_NAME:
            num_examples: 32
            in_dim: 4
    """,
}


def write_plugin(root: Path, package: str, model: str, builder: str) -> Path:
    """Write the plugin package ``root/package`` registering ``model`` and ``builder``."""
    for rel, text in PLUGIN_FILES.items():
        path = root / package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(text).lstrip("\n").replace("MODEL_NAME", model).replace("BUILDER_NAME", builder)
        path.write_text(text, encoding="utf-8")
    return root / package


def write_dist_info(site: Path, dist: str, entry_points: str) -> None:
    """A minimal installed-distribution record that importlib.metadata finds on sys.path."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip("\n"))


@pytest.fixture(autouse=True)
def isolation(monkeypatch):
    """Restore the registry, sys.modules and the plugin bookkeeping after each test."""
    monkeypatch.delenv("MMF_USER_DIR", raising=False)
    monkeypatch.setattr(plugins, "_user_dirs", {})
    monkeypatch.setattr(plugins, "_entry_points", set())
    monkeypatch.setattr(sys, "path", list(sys.path))
    registry.names("model")  # built-ins loaded before the snapshot
    tables = {kind: dict(table) for kind, table in registry._tables.items()}
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    for kind, table in registry._tables.items():
        table.clear()
        table.update(tables[kind])


# -- import_user_dir -----------------------------------------------------------------------------
def test_user_dir_package_is_imported_once(tmp_path, monkeypatch):
    pkg = write_plugin(tmp_path, "team_once", "team_once_mlp", "team_once_numbers")
    (pkg / "__init__.py").write_text((pkg / "__init__.py").read_text() + "\nCOUNT = [0]\nCOUNT[0] += 1\n")
    module = plugins.import_user_dir(str(pkg))
    assert module.__name__ == "team_once" and registry.get_model_class("team_once_mlp")
    assert plugins.import_user_dir(str(pkg)) is module
    assert plugins.import_user_dir("team_once") is module  # by name afterwards: same module
    assert module.COUNT == [1]
    assert str(tmp_path) in sys.path


def test_user_dir_as_module_name_and_py_file(tmp_path, monkeypatch):
    write_plugin(tmp_path / "site", "team_byname", "team_byname_mlp", "team_byname_numbers")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    plugins.import_user_dir("team_byname")
    assert registry.get_builder_class("team_byname_numbers")

    single = tmp_path / "single" / "team_single.py"
    single.parent.mkdir()
    single.write_text(
        "from villa_plugin.registry import registry\n"
        "registry.register_loss('team_single_loss')(object)\n"
    )
    plugins.import_user_dir(str(single))
    assert registry.get_loss_class("team_single_loss") is object


def test_relative_user_dir_tries_cwd_then_base_dirs(tmp_path, monkeypatch):
    write_plugin(tmp_path / "proj", "team_rel", "team_rel_mlp", "team_rel_numbers")
    monkeypatch.chdir(tmp_path)
    plugins.import_user_dir("./team_rel", base_dirs=[tmp_path / "proj"])
    assert registry.get_model_class("team_rel_mlp")


def test_missing_user_dir_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"does not exist \(looked at: .*nope"):
        plugins.import_user_dir("./plugins/nope")
    with pytest.raises(UserError, match="neither an existing directory nor an importable module"):
        plugins.import_user_dir("no_such_plugin_module_xyz")


def test_failing_plugin_import_names_plugin_and_error(tmp_path):
    pkg = tmp_path / "team_broken"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("x = 1\nraise ValueError('boom in plugin')\n")
    with pytest.raises(UserError) as info:
        plugins.import_user_dir(str(pkg))
    message = str(info.value)
    assert str(pkg) in message and "ValueError: boom in plugin" in message
    assert f"{pkg / '__init__.py'}:2" in message
    assert isinstance(info.value.__cause__, ValueError)


def test_plugin_name_clashing_with_imported_module(tmp_path):
    pkg = tmp_path / "json"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    with pytest.raises(UserError, match='different module named "json" is already imported'):
        plugins.import_user_dir(str(pkg))


def test_plugin_dir_must_be_a_module_name(tmp_path):
    (tmp_path / "my-plugin").mkdir()
    with pytest.raises(UserError, match="not a valid Python module name"):
        plugins.import_user_dir(str(tmp_path / "my-plugin"))


# -- user dir before composition ---------------------------------------------------------------
def test_user_dir_from_experiment_yaml_takes_part_in_composition(tmp_path):
    write_plugin(tmp_path / "exp", "team_yaml", "team_yaml_mlp", "team_yaml_numbers")
    exp = tmp_path / "exp" / "run.yaml"
    exp.write_text(
        "env: {user_dir: team_yaml}\n"  # relative to the YAML's folder
        "model: team_yaml_mlp\n"
        "datasets: [team_yaml_numbers]\n"
        "model_config: {team_yaml_mlp: {hidden: 5}}\n"
    )
    config = build_config([f"config={exp}", "dataset_config.team_yaml_numbers.num_examples=8"])
    assert config.model_config.team_yaml_mlp.hidden == 5
    assert config.model_config.team_yaml_mlp.num_labels == 2  # from the plugin's own YAML
    assert config.dataset_config.team_yaml_numbers.num_examples == 8


def test_user_dir_from_environment_variable(tmp_path, monkeypatch):
    pkg = write_plugin(tmp_path, "team_env", "team_env_mlp", "team_env_numbers")
    monkeypatch.setenv("MMF_USER_DIR", str(pkg))
    config = build_config(["model=team_env_mlp", "model_config.team_env_mlp.hidden=3"])
    assert config.model_config.team_env_mlp.hidden == 3
    assert config.env.user_dir == str(pkg)


def test_command_line_user_dir_beats_yaml(tmp_path):
    write_plugin(tmp_path, "team_cli", "team_cli_mlp", "team_cli_numbers")
    exp = tmp_path / "run.yaml"
    exp.write_text("env: {user_dir: ./does/not/exist}\n")
    config = build_config([f"config={exp}", f"env.user_dir={tmp_path / 'team_cli'}", "model=team_cli_mlp"])
    assert "team_cli_mlp" in config.model_config


# -- entry points ------------------------------------------------------------------------------
def test_entry_point_plugins_load_once(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_plugin(site, "team_ep", "team_ep_mlp", "team_ep_numbers")
    write_dist_info(site, "team_ep", "[villa_plugin.plugins]\nteam = team_ep\n")
    monkeypatch.syspath_prepend(str(site))
    assert plugins.load_entry_point_plugins() == ["team"]
    assert registry.get_model_class("team_ep_mlp")
    assert plugins.load_entry_point_plugins() == []


def test_failing_entry_point_names_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "team_bad_ep").mkdir(parents=True)
    (site / "team_bad_ep" / "__init__.py").write_text("import not_installed_dependency_xyz\n")
    write_dist_info(site, "team_bad_ep", "[villa_plugin.plugins]\nbadone = team_bad_ep\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(UserError) as info:
        plugins.load_entry_point_plugins()
    message = str(info.value)
    assert '"badone" (team_bad_ep, from team_bad_ep)' in message
    assert "ModuleNotFoundError" in message and "not_installed_dependency_xyz" in message


# -- end to end: `python -m villa_plugin.cli` with an external plugin --------------------------
def _run_cli(args, cwd: Path, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "MMF_USER_DIR"}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "villa_plugin.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_plugin_run(result, save_dir: Path, trace: Path, model: str, updates: int):
    assert result.returncode == 0, result.stdout + result.stderr
    events = trace.read_text().splitlines()
    assert "build_model hidden=12" in events  # the command line reached the plugin's model config
    assert "build_dataset train n=24" in events
    assert events.count("forward") >= updates
    saved = (save_dir / "config.yaml").read_text()
    assert f"model: {model}" in saved and "hidden: 12" in saved
    assert (save_dir / "train.log").read_text().strip()


def test_end_to_end_user_dir_plugin(tmp_path):
    pkg = write_plugin(tmp_path, "myteam_plugin", "myteam_mlp", "myteam_numbers")
    save_dir, trace = tmp_path / "save", tmp_path / "trace.txt"
    result = _run_cli(
        [
            f"env.user_dir={pkg}",
            "model=myteam_mlp",
            "dataset=myteam_numbers",
            f"training.trainer={TRAINER}",
            "run_type=train",
            f"env.save_dir={save_dir}",
            "training.max_updates=3",
            "training.batch_size=8",
            "training.device=cpu",
            "model_config.myteam_mlp.hidden=12",
            "dataset_config.myteam_numbers.num_examples=24",
        ],
        cwd=tmp_path,
        extra_env={"MYTEAM_TRACE": str(trace)},
    )
    _assert_plugin_run(result, save_dir, trace, "myteam_mlp", updates=3)


def test_end_to_end_entry_point_plugin_with_yaml_experiment(tmp_path):
    site = tmp_path / "site"
    write_plugin(site, "myteam_ep_plugin", "myteam_ep_mlp", "myteam_ep_numbers")
    write_dist_info(site, "myteam_ep_plugin", "[villa_plugin.plugins]\nmyteam = myteam_ep_plugin\n")
    save_dir, trace = tmp_path / "save", tmp_path / "trace.txt"
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        textwrap.dedent(
            f"""
            model: myteam_ep_mlp
            datasets: [myteam_ep_numbers]
            run_type: train
            training: {{trainer: {TRAINER}, max_updates: 2, batch_size: 8, device: cpu}}
            env: {{save_dir: {save_dir}}}
            model_config: {{myteam_ep_mlp: {{hidden: 12}}}}
            dataset_config: {{myteam_ep_numbers: {{num_examples: 24}}}}
            """
        )
    )
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    result = _run_cli(
        ["config=exp.yaml"], cwd=tmp_path, extra_env={"MYTEAM_TRACE": str(trace), "PYTHONPATH": pythonpath}
    )
    _assert_plugin_run(result, save_dir, trace, "myteam_ep_mlp", updates=2)


def test_end_to_end_user_error_exit_code(tmp_path):
    result = _run_cli(["training.max_udpates=3"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("mmf_run: error: ")
    assert "Traceback" not in result.stderr and 'Did you mean "training.max_updates"' in result.stderr
