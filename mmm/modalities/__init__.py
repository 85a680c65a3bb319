"""Modalities: each a codec, a tokenizer plus an embedder, and a :class:`~mmm.modalities.base.Modality`
that plugs them into a run.

This package's import is light on purpose: the data layer imports the codecs
(:mod:`mmm.modalities.text.codec`, ...), and the modalities import the data layer's stages, so
importing the package must not import every modality. The built-in ones are registered by
:mod:`mmm.modalities.builtin`, which the registries import on their first lookup.
"""
