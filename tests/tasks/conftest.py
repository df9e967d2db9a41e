"""Task tests share the data helpers of tests/datasets and the tiny-model helpers of tests/models."""
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _helpers in ("datasets", "models"):
    _path = os.path.join(_TESTS, _helpers)
    if _path not in sys.path:
        sys.path.insert(0, _path)
