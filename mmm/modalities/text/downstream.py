"""Text inputs downstream (``mmm embed``, ``mmm finetune``, probes): a string or a ``(first, second)`` pair.

Tokenized as ``[CLS] a [SEP]`` / ``[CLS] a [SEP] b [SEP]`` (BERT, Devlin et al. 2019; an encoder with segment
embeddings puts ``b [SEP]`` in segment 1, as HF's ``token_type_ids``), cut longest-first to the encoder's position
table as HF tokenizers cut a pair.
Raw files: ``.txt``, one input per non-empty line; tables: the ``--text_column`` cell. Embedded tasks
(:func:`text_tasks`): ``stdlib-package`` and the sentence-pair ``docstring-signature``, both real data from
the standard library of the Python that runs them (:mod:`mmm.downstream.tasks`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from torch import nn

from mmm.downstream.inputs import TokenIdInputs, longest_first
from mmm.downstream.tasks import (DownstreamSizes, DownstreamTask, Splits, docstring_signature_task,
                                  stdlib_package_task)


class TextInputs(TokenIdInputs):
    """Strings and string pairs → packed token ids of a text encoder (it must carry its tokenizer)."""

    modality = "text"
    file_suffixes = (".txt",)

    def __init__(self, encoder: nn.Module, source: str = "") -> None:
        super().__init__(encoder, source)
        self.tokenizer = getattr(encoder, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{source}: the text encoder has no tokenizer attached (an HF folder needs its "
                             "tokenizer.json or vocab.txt next to config.json)")

    @property
    def has_cls(self) -> bool:
        return True

    def prepare(self, raw: Any, where: str = "") -> np.ndarray:
        tok = self.tokenizer
        parts = list(raw) if isinstance(raw, (tuple, list)) else [raw]
        if not 1 <= len(parts) <= 2 or not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{where}: a text input is a string or a pair of strings")
        ids = [tok.encode(p)[0] for p in parts]
        room = self.max_len - 1 - len(ids)  # [CLS] + one [SEP] per part
        keep = longest_first([len(x) for x in ids], room)
        if keep != [len(x) for x in ids]:
            self.truncated += 1
            ids = [x[:k] for x, k in zip(ids, keep)]
        out = [np.array([tok.cls_id])]
        for x in ids:
            out += [x, np.array([tok.sep_id])]
        return np.concatenate(out).astype(np.int64)

    @classmethod
    def decode_sample(cls, sample: Dict[str, Any]) -> Tuple[str, Optional[int]]:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        if "txt" not in sample:
            raise ValueError(f"{where}: no 'txt' field")
        meta = json.loads(bytes(sample["json"]).decode("utf-8")) if "json" in sample else {}
        return bytes(sample["txt"]).decode("utf-8"), meta.get("label")

    @classmethod
    def read_file(cls, path: Path, rel: str, skip_bad: bool):
        from mmm.downstream.data import read_lines

        return read_lines(path, rel)


def _stdlib_package(sizes: DownstreamSizes) -> Splits:
    s = stdlib_package_task(sizes.train_per_class, sizes.eval_per_class)
    return s["train"], s["dev"], s["test"]


def _docstring_signature(sizes: DownstreamSizes) -> Splits:
    s = docstring_signature_task(sizes.train_per_class, sizes.eval_per_class)
    return s["train"], s["dev"], s["test"]


def text_tasks() -> Dict[str, DownstreamTask]:
    """The text modality's embedded tasks (:meth:`~mmm.modalities.text.modality.TextModality.downstream_tasks`)."""
    return {
        "stdlib-package": DownstreamTask("text", "real", "Python stdlib docstrings → top-level package, split by "
                                         "module", _stdlib_package),
        "docstring-signature": DownstreamTask("text", "real", "(function signature, docstring) pairs → belongs / "
                                              "does not (negatives from the same module), split by module",
                                              _docstring_signature),
    }
