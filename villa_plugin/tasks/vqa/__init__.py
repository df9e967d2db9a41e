"""VQA v2: builder ``vqa2``, head ``vqa``, metric ``vqa_accuracy``, the bundled demo."""
from villa_plugin.tasks.vqa import builder, head, metrics  # noqa: F401  (register)
