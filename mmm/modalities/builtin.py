"""The built-in modalities: importing this module registers them (their modalities, embedders,
tokenizers and modality-specific maskers). The registries import it on their first lookup
(``plugins`` in :mod:`mmm.registry`).

Each built-in modality is one package, ``mmm/modalities/<name>/``: ``codec`` (decode + validate one
sample, shared by the shard writer and the reader), ``tokenizer`` or ``frontend``, ``pipeline``
(the data stages), ``embedder``, ``masking`` where it has maskers of its own, and ``modality``
(the :class:`~mmm.modalities.base.Modality` that plugs them into a run)."""
from mmm.modalities.text import embedder, modality, tokenizer  # noqa: F401
from mmm.modalities.dna import masking, modality, tokenizer  # noqa: F401,F811
from mmm.modalities.image import embedder, modality  # noqa: F401,F811
from mmm.modalities.audio import embedder, masking, modality  # noqa: F401,F811
from mmm.modalities.image_text import masking, modality, regions  # noqa: F401,F811
