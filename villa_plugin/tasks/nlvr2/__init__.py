"""NLVR2: builder ``nlvr2``, head ``nlvr2_paired_attn``, metrics ``nlvr2_accuracy`` / ``nlvr2_consistency``."""
from villa_plugin.tasks.nlvr2 import builder, head, metrics  # noqa: F401  (register)
