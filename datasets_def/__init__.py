"""Dataset definitions: how each modality's raw data becomes WebDataset shards.

Importing this package registers every definition in :data:`mmm.registry.DATASETS`.
"""
from datasets_def import text  # noqa: F401  (registers "text")
