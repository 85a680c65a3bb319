"""mmm — multimodal masked modeling on one packed Transformer encoder.

``mmm.load_encoder(source, modality="text")`` returns one modality's encoder as a plain
``nn.Module`` (from an mmm checkpoint, a saved encoder folder, or a local HF BERT folder).
"""
__version__ = "0.1.0"


def load_encoder(source, modality: str = "text", **kwargs):
    """Load one modality's encoder; see :func:`mmm.encoders.load_encoder`."""
    from mmm.encoders import load_encoder as _load

    return _load(source, modality=modality, **kwargs)


__all__ = ["load_encoder", "__version__"]
