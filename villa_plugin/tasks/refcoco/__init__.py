"""Referring expressions: builder ``refcoco``, heads ``re`` / ``re_mlp2``, loss ``re_rank``, metric ``refcoco_accuracy``."""
from villa_plugin.tasks.refcoco import builder, head, metrics  # noqa: F401  (register)
