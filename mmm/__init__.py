"""mmm — multimodal masked modeling on one packed Transformer encoder."""
__version__ = "0.1.0"
