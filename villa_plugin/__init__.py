"""villa_plugin: VILLA adversarial training for MMF-style, registry-based V+L research."""
from villa_plugin.registry import registry  # noqa: F401

__version__ = "0.1.0"
