"""Test helpers shared across test folders: ``uniter_testlib`` (tiny UNITER configs and batches)
lives next to the UNITER trunk's tests and is importable from every test module."""
import os
import sys

_SHARED_HELPER_DIRS = [os.path.join(os.path.dirname(__file__), "backbones", "uniter")]
for _path in _SHARED_HELPER_DIRS:
    if _path not in sys.path:
        sys.path.insert(0, _path)
