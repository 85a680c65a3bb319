"""Modalities: each a tokenizer plus an embedder. Importing this package registers them."""
from mmm.modalities import text, text_tokenizer  # noqa: F401  (registers the text embedder and tokenizers)
