"""GQA (balanced): builder ``gqa`` (LXMERT's JSON records), metric ``gqa_accuracy``, the test submission JSON."""
from villa_plugin.tasks.gqa import builder, metrics  # noqa: F401
