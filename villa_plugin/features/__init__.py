"""Images -> region features -> UNITER img_db and/or LXMERT TSV (``mmf_extract``).

- :mod:`.images`: list inputs (folder, glob, list file), decode robustly (EXIF, CMYK, grayscale, 16-bit,
  huge, truncated), one report entry per converted or skipped image.
- :mod:`.backends`: ``grid``, ``torchvision_frcnn`` and ``butd_r101``, built on torchvision ops; weights are
  user-supplied files (nothing downloads) or ``random``.
- :mod:`.writers`: resumable, per-batch committed img_db / TSV writers.
- :mod:`.extract`: the batched run (DataLoader decoding, progress, report); :mod:`.cli`: ``mmf_extract``.
"""
