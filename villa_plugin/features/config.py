"""``mmf_extract`` settings: defaults, an optional YAML file (``--config``), then command-line flags."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import yaml

from villa_plugin.common.errors import ConfigError

DEFAULTS: Dict[str, Any] = {
    "images": None,            # list of folders / globs / list files
    "output": None,            # the image db directory (UNITER's img_db/<name>)
    "backend": "grid",
    "weights": None,           # a weights file or "random"
    "backend_options": {},
    "format": "img_db",        # img_db | tsv | both
    "tsv": None,               # default <output>/obj36.tsv
    "tsv_boxes": 36,
    "conf_th": 0.2,
    "max_bb": 100,
    "min_bb": 10,
    "num_bb": 36,
    "compressed": False,
    "keep_all": False,
    "key_format": "{stem}.npz",
    "batch_size": 8,
    "num_workers": 2,
    "device": "auto",          # auto | cpu | cuda | cuda:N
    "max_pixels": 89_478_485,  # PIL's decompression-bomb limit: larger images are skipped
    "max_side": 2000,          # larger images are downscaled before the backend
    "report": None,            # default <output>/extract_report.json
    "log_interval": 30.0,      # seconds between progress lines when stderr is not a terminal
    "sync_seconds": 60.0,
    "seed": 0,                 # seeds --weights random      # how often __keys__ / the nbb side file are rewritten during the run
}
FORMATS = ("img_db", "tsv", "both")


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: file not found.")
    with open(path, "r", encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings (e.g. backend: grid).")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}.")
    return data


def resolve(cli: Dict[str, Any], config_path: Optional[str]) -> Dict[str, Any]:
    """Defaults <- YAML <- the flags given on the command line (``None`` = not given)."""
    settings = dict(DEFAULTS)
    if config_path:
        settings.update(load_yaml(config_path))
    options = dict(settings.get("backend_options") or {})
    for key, value in cli.items():
        if key == "backend_options":
            options.update(value or {})
        elif value is not None:
            settings[key] = value
    settings["backend_options"] = options
    if isinstance(settings["images"], str):
        settings["images"] = [settings["images"]]
    for key, hint in (("images", "--images DIR|GLOB|LIST"), ("output", "--output DB_DIR"),
                      ("weights", "--weights FILE (or --weights random)")):
        if not settings[key]:
            raise ConfigError(f"mmf_extract needs {hint} (on the command line or in --config).")
    if settings["format"] not in FORMATS:
        raise ConfigError(f"--format {settings['format']!r}: choose one of {', '.join(FORMATS)}.")
    if settings["conf_th"] == -1:
        settings["conf_th"] = -1  # an int, as UNITER's fixed-count db naming (feat_numbb{N}) expects
    settings["tsv"] = settings["tsv"] or os.path.join(settings["output"], "obj36.tsv")
    settings["report"] = settings["report"] or os.path.join(settings["output"], "extract_report.json")
    return settings
