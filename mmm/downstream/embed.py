"""``mmm embed``: pooled features of a modality's encoder for shards or raw files.

What a user does right after :func:`mmm.load_encoder`: run every input through the encoder (eval
mode) and keep one vector per input, [CLS] or mean-pooled. Output:

* a folder ``OUT/`` with ``features.npy`` ((n, d) float32), ``keys.txt`` (one sample key per line,
  row order), ``labels.npy`` when the shards carry labels (int64; -1 for a sample without a
  non-negative integer label), and ``embed.json`` (what was run; ``unlabelled``: how many samples
  have no label); or
* ``OUT.safetensors``: tensor ``features`` (and ``labels``), the keys in the metadata (``keys``,
  a JSON list) with the same run description.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from mmm.downstream.data import Split, is_shard_path, read_raw_inputs, read_shards
from mmm.downstream.inputs import load_adapter

PathLike = Union[str, Path]


def read_inputs(path: PathLike, modality: str, split: Optional[str] = None, text_column: Optional[str] = None,
                skip_bad: bool = False) -> Split:
    """Raw inputs of shards (labels kept when present) or of a folder / file of raw files; with ``skip_bad``,
    bad samples and rows are skipped and listed in ``skipped`` instead of stopping."""
    p = Path(path)
    if is_shard_path(p):
        return read_shards(p, modality, split, labelled=False, skip_bad=skip_bad, keep_encoded=True)
    if split is not None:
        raise ValueError(f"--split applies to shards; {p} holds no .tar shards")
    return read_raw_inputs(p, modality, text_column=text_column, skip_bad=skip_bad)


def label_array(values: List[Any]) -> Tuple[Optional[np.ndarray], int]:
    """``(labels (n,) int64, unlabelled count)``: -1 for a value that is not a non-negative integer;
    ``(None, n)`` when no value is one."""
    ok = [isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values]
    if not any(ok):
        return None, len(values)
    return np.asarray([v if good else -1 for v, good in zip(values, ok)], np.int64), ok.count(False)


def embed(source: PathLike, inputs: PathLike, out: PathLike, modality: str, *, pooling: str = "mean",
          batch_size: int = 64, split: Optional[str] = None, text_column: Optional[str] = None,
          timm_model: Optional[str] = None, skip_bad: bool = False) -> Dict[str, Any]:
    """Write the pooled features of ``inputs`` under ``out``; returns the run description.

    Args:
        source: an mmm ``.ckpt``, a ``save_encoder`` folder, an HF BERT folder (text) or a timm
            ViT weights file (image, with ``timm_model``).
        inputs: shards (folder of ``.tar`` / one ``.tar``) or a folder / file of raw inputs.
        out: output folder, or a path ending in ``.safetensors``.
        modality: a registered modality with downstream inputs (``text``, ``dna``, ``image``, ``audio``, a plug-in's).
        pooling: ``cls`` or ``mean``.
        batch_size: inputs per forward pass.
        split: ``train`` / ``val`` shards only.
        text_column: the column of a table input (text, DNA); None: the modality's default (DNA: ``sequence``;
            text: none, tables are then an error).
        timm_model: timm model name for a timm weights file.
        skip_bad: skip bad inputs (an empty table cell, an undecodable file or sample), counted in the
            result's ``skipped`` (with up to five ``skipped_examples``); False: the first one is an error.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size must be an integer >= 1, got {batch_size!r}")
    adapter = load_adapter(str(source), modality, timm_model=timm_model)
    adapter.check_pooling(pooling)
    text_column = text_column or type(adapter).default_column  # DNA: "sequence", as mmm finetune reads tables
    data = read_inputs(inputs, modality, split, text_column, skip_bad=skip_bad)
    refused: Optional[List[Tuple[int, str, str]]] = [] if skip_bad else None
    feats = adapter.features(data.inputs, pooling, batch_size=batch_size, where=data.where, skipped=refused)
    data.skip({i: reason for i, _, reason in refused or ()})  # read, but the encoder's preprocessing refused them
    if not data.inputs:
        raise ValueError(f"{inputs}: every input was bad and skipped ({len(data.skipped)}), e.g. "
                         f"{data.skipped[:1]}; nothing to embed")
    labels, unlabelled = label_array(data.labels)
    info: Dict[str, Any] = {"source": str(source), "inputs": str(inputs), "modality": modality, "pooling": pooling,
                            "samples": int(feats.shape[0]), "dim": int(feats.shape[1]),
                            "truncated": adapter.truncated, "labels": labels is not None,
                            "unlabelled": unlabelled, "skipped": len(data.skipped),
                            "skipped_examples": [list(s) for s in data.skipped[:5]]}
    o = Path(out)
    if o.suffix == ".safetensors":
        import torch
        from safetensors.torch import save_file

        o.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": torch.from_numpy(feats)}
        if labels is not None:
            tensors["labels"] = torch.from_numpy(labels)
        save_file(tensors, str(o), metadata={"keys": json.dumps(data.where), "embed": json.dumps(info)})
        info["files"] = [str(o)]
        return info
    if o.exists() and not o.is_dir():
        raise NotADirectoryError(f"{o} exists and is not a folder (use a folder, or a .safetensors path)")
    o.mkdir(parents=True, exist_ok=True)
    np.save(o / "features.npy", feats)
    (o / "keys.txt").write_text("".join(k.replace("\n", " ") + "\n" for k in data.where), encoding="utf-8")
    files = ["features.npy", "keys.txt", "embed.json"]
    if labels is not None:
        np.save(o / "labels.npy", labels)
        files.append("labels.npy")
    (o / "embed.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    info["files"] = [str(o / f) for f in files]
    return info
