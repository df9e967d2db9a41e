"""``python -m villa_plugin.features`` = ``mmf_extract``."""
from villa_plugin.features.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
