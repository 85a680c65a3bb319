"""DNA inputs downstream (``mmm embed``, ``mmm finetune``, probes): a string of bases.

Tokenized by the encoder's own DNA tokenizer (characters, k-mers or BPE: :mod:`mmm.modalities.dna.tokenizer`)
and cut to its position table. Raw files: FASTA (``.fa``/``.fasta``/``.fna``/``.fas``, gzipped too; one input
per record, as the DNA shard builder reads them) and ``.txt`` (one sequence per line); tables: the
``--text_column`` cell (default ``sequence``). Embedded task (:func:`dna_tasks`): ``dna-motifs``, the synthetic
genome windows of the ``dna`` dataset definition's embedded set, built into the cache on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from torch import nn

from mmm.downstream.inputs import TokenIdInputs
from mmm.downstream.tasks import DownstreamTask, embedded_shards, shard_splits
from mmm.modalities.dna.codec import FASTA_SUFFIXES



class DnaInputs(TokenIdInputs):
    """Base strings → packed token ids of a DNA encoder (it must carry its tokenizer)."""

    modality = "dna"
    default_column = "sequence"
    file_suffixes = (*FASTA_SUFFIXES, *(s + ".gz" for s in FASTA_SUFFIXES), ".txt")

    def __init__(self, encoder: nn.Module, source: str = "") -> None:
        super().__init__(encoder, source)
        self.tokenizer = getattr(encoder, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{source}: the dna encoder has no tokenizer attached")

    @property
    def has_cls(self) -> bool:
        return True

    def prepare(self, raw: Any, where: str = "") -> np.ndarray:
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"{where}: a DNA input must be a non-empty string of bases")
        try:
            ids = self.tokenizer.encode(raw).ids
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return self.cut(np.asarray(ids, np.int64))

    @classmethod
    def decode_sample(cls, sample: Dict[str, Any]) -> Tuple[str, Optional[int]]:
        from mmm.modalities.dna.pipeline import read_dna_sample

        w = read_dna_sample(sample)
        return w.seq, (None if w.label < 0 else w.label)

    @classmethod
    def read_file(cls, path: Path, rel: str, skip_bad: bool):
        from mmm.downstream.data import read_fasta, read_lines

        if path.name.lower().endswith(".txt"):
            return read_lines(path, rel)
        return read_fasta(path, rel, skip_bad)

    @classmethod
    def check_inputs(cls, split, skip_bad: bool):
        """Under ``skip_bad``: move inputs with a character no DNA tokenizer reads (a gap ``-``, a space, ``U``) to
        ``skipped``, as the shard readers do (without it the tokenizer's error names the input and the character)."""
        if not skip_bad:
            return split
        from mmm.modalities.dna.tokenizer import find_invalid_base

        found = {i: find_invalid_base(raw) for i, raw in enumerate(split.inputs) if isinstance(raw, str)}
        return split.skip({i: f"invalid DNA character {bad[1]!r} at position {bad[0]}"
                           for i, bad in found.items() if bad is not None})


def dna_tasks() -> Dict[str, DownstreamTask]:
    """The DNA modality's embedded task (:meth:`~mmm.modalities.dna.modality.DNAModality.downstream_tasks`)."""
    return {"dna-motifs": DownstreamTask("dna", "synthetic", "synthetic genome windows (motif class)",
                                         shard_splits(embedded_shards("dna"), "dna"))}
