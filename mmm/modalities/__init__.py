"""Modalities: each a tokenizer plus an embedder, and a :class:`~mmm.modalities.base.Modality` that
plugs them into a run. Importing this package registers them."""
from mmm.modalities import (  # noqa: F401  (registers every modality, embedder and tokenizer)
    audio, audio_modality, dna_modality, dna_tokenizer, image, image_modality, text, text_modality, text_tokenizer)
from mmm.modalities import image_text_modality, regions  # noqa: F401  (registers "image_text", "regions")
