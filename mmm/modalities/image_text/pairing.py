"""Re-pair the captions and images of a contrastive batch into joint image-text sequences.

An ``itc`` batch of the ``image_text`` modality holds B captions and B images as 2B separate
sequences (captions first). :func:`joint_pairs` builds, from the same inputs, a batch of joint
sequences (caption ``text[k]`` followed by image ``image[k]``, UNITER's single-stream layout) with
:class:`~mmm.batch.PairTargets` -- what ITM with hard negatives mined by contrastive similarity
needs (ALBEF, Li et al. 2021; UNITER's ITM-hard): the similarities come from encoding the items
alone, the negatives are then encoded jointly with their partners.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mmm.batch import ContrastiveTargets, ImageInput, PackedBatch, PairTargets, RegionInput, TokenInput
from mmm.core.packing import PackedSeqInfo, index_ranges


def joint_pairs(batch: PackedBatch, text: Sequence[int], image: Sequence[int], labels: Sequence[int],
                vision_key: str) -> PackedBatch:
    """Joint sequences (caption ``text[k]``, image ``image[k]``) from a contrastive batch's inputs.

    Args:
        batch: an ``itc`` batch (B captions, then B images; ``targets["itc"]``), on any device.
        text: caption index (0..B-1) of each joint pair.
        image: image index (0..B-1) of each joint pair.
        labels: 1 where the pair matches, else 0.
        vision_key: the batch's image input key (``image`` for patches, ``regions``).

    Returns:
        A batch on ``batch``'s device with ``targets["itm"]`` for the K pairs.
    """
    t = batch.targets.get("itc")
    if not isinstance(t, ContrastiveTargets):
        raise ValueError("joint_pairs needs a contrastive batch (targets['itc']); got targets "
                         f"{sorted(batch.targets)}")
    text_in, vis = batch.inputs["text"], batch.inputs[vision_key]
    device = text_in.ids.device
    b = t.count
    text_idx = torch.as_tensor(list(text), dtype=torch.long, device=device)
    image_idx = torch.as_tensor(list(image), dtype=torch.long, device=device)
    if text_idx.shape != image_idx.shape or len(labels) != text_idx.numel():
        raise ValueError(f"joint_pairs: text ({text_idx.numel()}), image ({image_idx.numel()}) and labels "
                         f"({len(labels)}) must have one entry per pair")
    seqlens = (batch.seq.cu_seqlens[1:] - batch.seq.cu_seqlens[:-1]).long().to(device)  # (2B,)
    t_len, i_len = seqlens[:b], seqlens[b:]
    t_start = torch.cumsum(t_len, 0) - t_len  # start of each caption inside text_in.ids
    pooled = torch.bincount(t.image_owner.to(device), minlength=b)  # image tokens without prefix
    prefix = int((i_len - pooled).min()) if b else 0  # [CLS] of patch images, 0 for regions

    k_t, k_i = t_len[text_idx], i_len[image_idx]  # (K,)
    lengths = k_t + k_i
    seq = PackedSeqInfo.from_seqlens(lengths.tolist())
    starts = seq.cu_seqlens[:-1].long().to(device)
    src_text = index_ranges(t_start[text_idx], k_t)  # rows of text_in.ids, pair after pair
    ids = text_in.ids.index_select(0, src_text)
    pos = text_in.position_ids.index_select(0, src_text)
    text_index = index_ranges(starts, k_t)
    image_starts = starts + k_t
    image_index = index_ranges(image_starts, k_i)
    if isinstance(vis, ImageInput):
        vision = ImageInput(vis.pixels.index_select(0, image_idx), None, drop_masked=False, index=image_index)
    elif isinstance(vis, RegionInput):
        r_start = torch.cumsum(i_len, 0) - i_len
        src = index_ranges(r_start[image_idx], k_i)
        vision = RegionInput(vis.features.index_select(0, src), vis.boxes.index_select(0, src),
                             vis.position_ids.index_select(0, src), None, image_index)
    else:
        raise TypeError(f"joint_pairs: unsupported image input {type(vis).__name__}")
    inner = k_t - 2  # caption tokens without [CLS] / [SEP]
    patches = k_i - prefix
    k = text_idx.numel()
    targets = {"itm": PairTargets(
        cls_positions=starts, labels=torch.as_tensor(list(labels), dtype=torch.long, device=device),
        text_positions=index_ranges(starts + 1, inner),
        text_pair=torch.repeat_interleave(torch.arange(k, device=device), inner),
        image_positions=index_ranges(image_starts + prefix, patches),
        image_pair=torch.repeat_interleave(torch.arange(k, device=device), patches))}
    return PackedBatch(seq.to(device), {"text": TokenInput(ids, pos, text_index), vision_key: vision}, targets,
                       task=batch.task)
