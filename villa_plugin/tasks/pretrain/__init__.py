"""VILLA stage 1: UNITER pre-training tasks (MLM, MRFR, MRC / MRC-kl, ITM + WRA) and their adversarial choices.

Modules: :mod:`.heads` (pre-training heads and ties), :mod:`.model` (``UniterForPretraining``),
:mod:`.losses` (official normalisations), :mod:`.ot` (WRA / IPOT), :mod:`.masking` (seeded masking and
ITM negatives), :mod:`.collate` (batches), :mod:`.checkpoint` (loading pre-training heads),
:mod:`.adversarial` (per-task VILLA choices),
:mod:`.metrics` (validation metrics, registered), :mod:`.dataset` / :mod:`.builder` (corpora as task
mixtures; builders ``pretrain_coco``, ``pretrain_vg``, ``pretrain_cc``, ``pretrain_sbu``), :mod:`.demo`,
:mod:`.registered` (model ``uniter_pretrain``). See ``docs/pretraining.md``.
"""
from villa_plugin.tasks.pretrain import builder, metrics, registered  # noqa: F401  (register)
