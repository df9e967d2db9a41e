"""Image-text retrieval: builder ``retrieval``, head ``itm``, loss ``itm_triplet``, metric ``retrieval_recall``."""
from villa_plugin.tasks.retrieval import builder, head, metrics  # noqa: F401  (register)
