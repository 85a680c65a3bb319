"""Maskers shared by several modalities: which positions of a sequence to hide, and what to write
there.

Importing this package registers them in :data:`mmm.registry.MASKERS` (token: bert_random,
whole_word, span, ngram; patch: mae_random, beit_block, simmim_random). Maskers that belong to one
modality live in its package (``mmm/modalities/<name>/masking.py``: dna_random, dna_span,
time_span, spec_patch, region_random) and are registered by :mod:`mmm.modalities.builtin`.
"""
from mmm.masking import patch, token  # noqa: F401
