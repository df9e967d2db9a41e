"""Test helpers shared across test folders, importable from every test module: ``uniter_testlib``
(tiny UNITER configs and batches, beside the UNITER trunk's tests), the data helpers of
``tests/datasets`` and ``models_testlib`` (a registered model and batches from ``mmf_run`` arguments)."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
_SHARED_HELPER_DIRS = [os.path.join(_TESTS, "backbones", "uniter"), os.path.join(_TESTS, "datasets"),
                       os.path.join(_TESTS, "models")]
for _path in _SHARED_HELPER_DIRS:
    if _path not in sys.path:
        sys.path.insert(0, _path)
