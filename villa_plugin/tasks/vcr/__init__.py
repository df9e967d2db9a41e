"""VCR: builder ``vcr``, head ``vcr``, metrics ``vcr_q_a`` / ``vcr_qa_r`` / ``vcr_q_ar``."""
from villa_plugin.tasks.vcr import builder, head, metrics  # noqa: F401  (register)
