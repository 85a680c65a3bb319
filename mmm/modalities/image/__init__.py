"""The image modality: its codec, tokenizer or front end, data pipeline, embedder, maskers and modality."""
