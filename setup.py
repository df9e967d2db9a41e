"""villa_plugin: VILLA adversarial training in an MMF-compatible, registry-based core."""
import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def bundled_data_files():
    """configs/ and projects/ (YAML and JSON) ship as data under <prefix>/share/villa_plugin/ (keeping layout)."""
    entries = {}
    for top in ("configs", "projects"):
        for path in sorted(p for p in (HERE / top).rglob("*") if p.suffix in (".yaml", ".json")):
            rel_dir = path.parent.relative_to(HERE)
            entries.setdefault(os.path.join("share", "villa_plugin", str(rel_dir)), []).append(
                str(path.relative_to(HERE))
            )
    return sorted(entries.items())


setup(
    name="villa_plugin",
    version="0.1.0",
    description="VILLA (Gan et al., NeurIPS 2020) adversarial training for MMF-style V+L research",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["villa_plugin", "villa_plugin.*"]),
    package_data={"villa_plugin.tasks": ["*/defaults.yaml"]},  # each task package's own defaults
    data_files=bundled_data_files(),
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "omegaconf>=2.3,<2.5",
        "lmdb>=1.4",
        "msgpack>=1.0",
        "msgpack-numpy>=0.4.8",
        "lz4>=4.0",
        "numpy>=1.24",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "Pillow>=9.0",      # mmf_extract decoding (already a torchvision dependency)
        "PyYAML>=5.1",      # mmf_extract --config (already an omegaconf dependency)
    ],
    extras_require={
        "distributed": ["fairscale==0.4.13"],
        "test": ["pytest>=7.4", "fairscale==0.4.13"],
    },
    entry_points={
        "console_scripts": ["mmf_run = villa_plugin.cli:run", "mmf_extract = villa_plugin.features.cli:run"],
    },
)
