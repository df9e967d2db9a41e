"""GQA's metric ``gqa_accuracy``: exact match of the arg-max answer (LXMERT's local evaluation)."""
from __future__ import annotations

from villa_plugin.registry import registry
from villa_plugin.tasks.vqa.metrics import VQAAccuracy


@registry.register_metric("gqa_accuracy")
class GQAAccuracy(VQAAccuracy):
    """``Σ target[argmax(scores)] / N``; GQA's targets are 1.0 on the one answer, so this is the exact
    match of LXMERT's ``evaluate`` (``label.get(ans, 0)``). A question whose answer is outside the
    vocabulary scores 0, as in the reference."""
