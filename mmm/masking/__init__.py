"""Maskers: which positions of a sequence to hide, and what to write there.

Importing this package registers the token maskers in :data:`mmm.registry.MASKERS`.
"""
from mmm.masking import dna, patch, time_span, token  # noqa: F401  (token: bert_random, whole_word, span, ngram; patch: mae_random, beit_block, simmim_random; dna: dna_random, dna_span; time_span: time_span, spec_patch)
from mmm.masking import region  # noqa: F401  (region: region_random)
