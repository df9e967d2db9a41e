"""SNLI-VE: builder ``visual_entailment``, head ``ve`` (metric: the generic ``accuracy``)."""
from villa_plugin.tasks.visual_entailment import builder, head  # noqa: F401  (register)
