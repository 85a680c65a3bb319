"""Linear probe on frozen encoder features: the standard test of what masked pretraining learned.

Features are the mean of a sequence's final hidden states (or its first, [CLS], token) computed
on *unmasked* inputs by the shared encoder; a multinomial logistic regression (scikit-learn,
standardised features) is fitted on labelled training samples and scored on a held-out split.
Comparing a pretrained encoder with the same architecture at random initialisation, on the same
samples, isolates what pretraining contributed (MAE, He et al. 2022, reports linear probing
alongside fine-tuning for this reason).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from mmm.data.stream import SampleErrorHandler, make_pipeline
from mmm.eval_mode import eval_mode
from mmm.model import MaskedModel

POOLING = ("mean", "first")


@dataclass
class ProbeScore:
    """Held-out accuracy of a linear probe, with the chance level (majority class) for scale."""

    accuracy: float
    chance: float
    train_samples: int
    test_samples: int
    classes: int


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(N, d) packed hidden states → (B, d) one vector per sequence (``mean`` or ``first`` token)."""
    if how not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {how!r}")
    starts = cu_seqlens[:-1].long()
    if how == "first":
        return hidden.index_select(0, starts)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_of = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    sums = torch.zeros(len(lengths), hidden.shape[1], dtype=hidden.dtype, device=hidden.device).index_add_(0, seq_of, hidden)
    return sums / lengths[:, None].to(hidden.dtype)


@torch.no_grad()
def extract_features(model: MaskedModel, modality: Any, urls: List[str], *, batch_size: int = 64,
                     max_samples: Optional[int] = None, pooling: str = "mean") -> Tuple[np.ndarray, np.ndarray]:
    """Pooled features and labels of the labelled samples in ``urls`` (no masking, eval transforms).

    Args:
        model: the masked model (its shared encoder and ``modality``'s embedder are used).
        modality: the :class:`~mmm.modalities.base.Modality` that reads the shards.
        urls: shard urls whose samples carry a ``label``.
        batch_size: samples per forward pass.
        max_samples: stop after this many labelled samples.
        pooling: ``mean`` or ``first``.

    Returns:
        ``(features (n, d) float32, labels (n,) int64)``; samples without a label are left out.
    """
    device = next(model.parameters()).device
    stages = modality.stages(None, batch_size=batch_size, seed=0, handler=SampleErrorHandler(), fixed_masking=True,
                             epochs=None, train=False)
    feats, labels = [], []
    n = 0
    with eval_mode(model):
        for batch in make_pipeline(urls, stages=stages, shuffle_shards=False, shuffle_buffer=0):
            y = batch.extras.get("labels")
            if y is None:
                raise ValueError(f"the {modality.name} pipeline gives no labels: a linear probe needs labelled shards")
            batch = batch.to(device)
            h = pool(model.encode(batch), batch.seq.cu_seqlens, pooling)
            keep = (y >= 0).cpu()
            feats.append(h.float().cpu()[keep].numpy())
            labels.append(y[keep].numpy())
            n += int(keep.sum())
            if max_samples is not None and n >= max_samples:
                break
    if not feats or n == 0:
        raise ValueError(f"no labelled samples found in {urls[:3]}{' ...' if len(urls) > 3 else ''}")
    x, y = np.concatenate(feats), np.concatenate(labels).astype(np.int64)
    if max_samples is not None:
        x, y = x[:max_samples], y[:max_samples]
    return x, y


def linear_probe(train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray], *, c: float = 1.0,
                 seed: int = 0) -> ProbeScore:
    """Fit a logistic-regression probe on ``train`` features and score it on ``test``.

    Args:
        train: ``(features, labels)`` to fit on; labels are non-negative class ids (integral floats accepted).
        test: held-out ``(features, labels)``.
        c: inverse L2 regularisation strength.
        seed: solver seed.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline as sk_pipeline
    from sklearn.preprocessing import StandardScaler

    from mmm.downstream.knn import class_ids

    (xtr, ytr), (xte, yte) = train, test
    ytr, yte = class_ids(ytr, "training labels"), class_ids(yte, "test labels")
    if len(np.unique(ytr)) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes in the training labels, got {np.unique(ytr)}")
    if len(yte) == 0:
        raise ValueError("linear probe: the test split is empty")
    clf = sk_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    clf.fit(xtr, ytr)
    acc = float((clf.predict(xte) == yte).mean())
    chance = float(np.bincount(yte).max() / len(yte))
    return ProbeScore(acc, chance, len(ytr), len(yte), int(len(np.unique(np.concatenate([ytr, yte])))))
