"""What every objective head returns, and the helpers heads share.

Every head is built by :func:`mmm.model.build_model` as ``Head(dim, embedders, encoder_cfg, **args)``:
``dim`` is the encoder width, ``embedders`` the model's embedders by modality (for tied token tables,
patch grids and vocabulary sizes), ``encoder_cfg`` the shared encoder's config; ``args`` come from the
objective's ``args`` in the config. Head docstrings describe the three builder arguments only where the
head reads something particular from them.

A head is called as ``head(hidden, batch)`` and never receives the model. A head whose input must first
be derived from the shared pass and encoded again (ITM on mined hard negatives) names a model-level step
strategy in its ``step`` attribute, ``(registry name, args)``; the builder creates it (:mod:`mmm.steps`)
and the model runs it before calling the head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict

import torch
from torch import nn

if TYPE_CHECKING:
    from mmm.batch import PackedBatch


@dataclass
class ObjectiveOutput:
    """One objective's result for a batch.

    Args:
        loss: scalar loss (mean over this objective's predictions; in data-parallel training the sum
            over this rank's predictions divided by the global count per rank, see :func:`global_mean`).
        metrics: extra scalars to log (e.g. ``acc``), detached.
        count: number of predictions the loss averages over (for exact aggregation).
    """

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0


def full_precision(device: torch.device):
    """Autocast off on ``device``'s type, for scores whose rounding matters: bf16 rounds a similarity logit near
    CLIP's cap of 100 by up to 0.25 (steps of 0.5 between 64 and 128) and a cosine cost by 1.4%. Inputs must be
    cast to fp32 inside (autocast off does not cast them)."""
    return torch.autocast(device.type, enabled=False)


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor, share_ties: bool = False) -> torch.Tensor:
    """Share of rows whose label's logit is the row's highest (detached scalar).

    Args:
        logits: (M, V) scores.
        labels: (M,) int64 class indices.
        share_ties: a label tied with others for the top score counts ``1 / ties`` (a tie broken at random, in
            expectation), so a collapsed head (every logit equal) scores 1/V, not 1. Heads pass it when
            evaluating (not ``self.training``); it costs one more pass over the logits.

    Without ``share_ties`` an exact tie for the top score counts as correct (cheap, for training logs, where fp32
    logits rarely tie); it reads the row maximum (a vectorised reduction) instead of ``argmax``, whose CPU kernel
    is about ten times slower on an MLM head's (M, V) logits. Half-precision logits (a head under bf16 autocast)
    tie often, so they always share ties (bf16 counted 0.5 points too many in training logs).
    """
    logits = logits.detach()
    top = logits.amax(-1, keepdim=True)  # (M, 1)
    hit = (logits.gather(1, labels[:, None]) >= top).float()  # (M, 1)
    if share_ties or logits.dtype in (torch.bfloat16, torch.float16):
        hit = hit / (logits == top).sum(-1, keepdim=True).clamp(min=1)
    return hit.mean()


def global_mean(loss_sum: torch.Tensor, count: int, sync: bool = True) -> torch.Tensor:
    """``loss_sum`` divided by the *global* prediction count per rank, so data-parallel training is exact.

    DDP and FSDP average gradients over ranks. With a per-rank mean (``loss_sum / count``) a rank
    with few predictions would weigh each of them more than a rank with many, so two ranks x B
    would not train like one rank x 2B. Dividing by ``global_count / world_size`` makes the
    ranks' average equal to the mean over every prediction of the step, and with it the averaged
    gradients. With one process (or ``sync=False``) this is the plain mean.

    The all-reduce of the count is a collective: when it runs, every rank must call this the
    same number of times per step (also with ``count == 0``). Call it with ``sync=False``
    where ranks may see different numbers of batches (validation).

    Args:
        loss_sum: scalar sum of the per-prediction losses on this rank.
        count: number of predictions on this rank.
        sync: all-reduce the count when ``torch.distributed`` runs with more than one rank.
    """
    dist = torch.distributed
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = loss_sum.new_full((), float(count), dtype=torch.float32)  # a fill: no host-to-device copy
        dist.all_reduce(total)
        denominator = total / dist.get_world_size()
        return loss_sum / denominator.clamp_min(1e-12)  # no prediction on any rank: loss_sum is 0 too
    return loss_sum / max(count, 1)


def in_lockstep(module: nn.Module) -> bool:
    """Whether ``module`` runs in a training step, which every rank takes the same number of times.

    Only then may a head all-reduce its count (:func:`global_mean`'s ``sync``). Validation and
    evaluation (no gradients, or eval mode) keep the plain per-rank mean: ranks may see different
    numbers of batches there, and the trainer reduces those means across ranks weighted by their
    counts (:class:`~mmm.train.module.MaskedModelingModule`).
    """
    return module.training and torch.is_grad_enabled()


def zero_output(hidden: torch.Tensor, module: nn.Module, metrics=(), sync_count: bool = True) -> ObjectiveOutput:
    """A zero loss still connected to ``hidden`` and to every parameter of ``module`` (no target this batch).

    Touching the head's parameters keeps DDP's "every parameter received a gradient" check happy.

    Args:
        hidden: the batch's encoder output.
        module: the head.
        metrics: names of the head's metrics (logged as zero).
        sync_count: the head normalises by :func:`global_mean`: in a training step this rank joins
            the count all-reduce the other ranks run (with a count of 0), so none of them waits.
    """
    zero = hidden.sum() * 0.0 + sum(p.sum() for p in module.parameters()) * 0.0
    if sync_count:
        zero = global_mean(zero, 0, in_lockstep(module))
    return ObjectiveOutput(zero, {m: zero.detach() for m in metrics}, 0)


def sole_input(batch: "PackedBatch", modality: str, objective: str,
               why: str = "the teacher encodes them as the batch's sequences"):
    """The batch's ``modality`` input when it fills the packed stream alone (a teacher, a generator or a causal
    pass reads it as the batch's sequences), None when the batch has none; a ``ValueError`` naming
    ``objective`` and ``why`` it needs that when the batch mixes modalities."""
    inp = batch.inputs.get(modality)
    if inp is None:
        return None
    ids = getattr(inp, "ids", None)
    if inp.index is not None or (ids is not None and ids.numel() != batch.num_tokens):
        raise ValueError(f"objective {objective}: the {modality!r} tokens must fill the packed stream alone "
                         f"({why}); this batch mixes modalities")
    return inp


def modality_embedder(embedders: Dict[str, nn.Module], modality: str, objective: str) -> nn.Module:
    """The embedder of ``modality`` a head is built on; a ``ValueError`` naming ``objective`` and the model's
    modalities when it has none."""
    if modality not in embedders:
        raise ValueError(f"objective {objective}: modality {modality!r} has no embedder in this model "
                         f"(modalities: {sorted(embedders)})")
    return embedders[modality]


def token_table(embedders: Dict[str, nn.Module], modality: str, objective: str, needs: str) -> nn.Embedding:
    """The token table (``.tokens``) of ``modality``'s embedder, for heads over a discrete vocabulary; a
    ``ValueError`` saying the head ``needs`` a discrete token modality otherwise."""
    tokens = getattr(modality_embedder(embedders, modality, objective), "tokens", None)
    if not isinstance(tokens, nn.Embedding):
        raise ValueError(f"objective {objective}: the {modality!r} embedder has no token table; {needs} needs a "
                         f"discrete token modality")
    return tokens
