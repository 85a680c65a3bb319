"""Dataset definitions: how each modality's raw data becomes WebDataset shards.

Importing this package registers every definition in :data:`mmm.registry.DATASETS`.
"""
from datasets_def import audio, dna, image, text  # noqa: F401  (registers "audio", "dna", "image", "text")
from datasets_def import image_text  # noqa: F401  (registers "image_text")
