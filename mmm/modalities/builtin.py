"""The built-in modalities: importing this module registers them (their modalities, embedders and
tokenizers). The registries import it on their first lookup (``plugins`` in :mod:`mmm.registry`)."""
from mmm.modalities import (  # noqa: F401  (registers every modality, embedder and tokenizer)
    audio, audio_modality, dna_modality, dna_tokenizer, image, image_modality, text, text_modality, text_tokenizer)
from mmm.modalities import image_text_modality, regions  # noqa: F401  (registers "image_text", "regions")
