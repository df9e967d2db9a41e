"""VILLA stage 1: UNITER pre-training tasks (MLM, MRFR, MRC / MRC-kl, ITM + WRA) and their adversarial choices.

Modules: :mod:`.heads` (pre-training heads and ties), :mod:`.model` (``UniterForPretraining``),
:mod:`.losses` (official normalisations), :mod:`.ot` (WRA / IPOT), :mod:`.masking` (seeded masking and
ITM negatives), :mod:`.collate` (batches), :mod:`.checkpoint` (loading pre-training heads),
:mod:`.adversarial` (per-task VILLA choices),
:mod:`.metrics` (validation metrics). See ``docs/pretraining.md``.
"""
