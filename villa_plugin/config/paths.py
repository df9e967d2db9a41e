"""Where the bundled YAML (configs/, projects/) lives: the source checkout or the installed copy."""
from __future__ import annotations

import sys
from pathlib import Path

from villa_plugin.common.errors import ConfigError

_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]
_INSTALLED_ROOT = Path(sys.prefix) / "share" / "villa_plugin"


def bundled_root() -> Path:
    """Directory holding ``configs/`` and ``projects/``: the checkout (editable install) or the
    ``<prefix>/share/villa_plugin`` copy that ``pip install`` writes."""
    for root in (_CHECKOUT_ROOT, _INSTALLED_ROOT):
        if (root / "configs" / "defaults.yaml").is_file():
            return root
    raise ConfigError(
        f"Cannot find the bundled configs (looked for configs/defaults.yaml under {_CHECKOUT_ROOT} and "
        f"{_INSTALLED_ROOT}). Reinstall the package with `pip install -e .` from the repository root."
    )


def bundled_path(relative: str) -> str:
    """Absolute path of a bundled file, e.g. ``bundled_path("configs/models/uniter/defaults.yaml")``."""
    return str(bundled_root() / relative)
