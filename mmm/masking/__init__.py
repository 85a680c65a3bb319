"""Maskers: which positions of a sequence to hide, and what to write there.

Importing this package registers the token maskers in :data:`mmm.registry.MASKERS`.
"""
from mmm.masking import token  # noqa: F401  (registers "bert_random", "whole_word", "span", "ngram")
