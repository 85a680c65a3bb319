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
from mmm.host_reads import on_host


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
    text, image, labels = [int(j) for j in text], [int(i) for i in image], [int(y) for y in labels]
    if len(text) != len(image) or len(labels) != len(text):
        raise ValueError(f"joint_pairs: text ({len(text)}), image ({len(image)}) and labels "
                         f"({len(labels)}) must have one entry per pair")
    # every size and index is computed on the host from the layout's host lengths: no device read
    t_len, i_len = list(batch.seq.lengths[:b]), list(batch.seq.lengths[b:])  # captions, then images
    extra = sum(i_len) - t.image_positions.shape[0]  # image tokens not pooled: each image's [CLS], or none (regions)
    prefix = extra // b if b else 0
    if prefix * b != extra:
        raise ValueError(f"joint_pairs: the {b} images hold {extra} tokens that are not pooled, not the same "
                         f"number per image")
    k_t, k_i = [t_len[j] for j in text], [i_len[i] for i in image]  # (K,) per pair
    seq = PackedSeqInfo.from_seqlens([a + c for a, c in zip(k_t, k_i)])
    starts = seq.cu_seqlens[:-1].long()  # host tensors until the copies below
    k = len(text)
    with on_host():
        t_start = torch.tensor([0] + t_len[:-1]).cumsum(0)  # start of each caption inside text_in.ids
        longest = (max(k_t, default=2) - 2, max(k_i, default=prefix) - prefix)  # per pair: caption words, image tokens
        k_t, k_i = torch.tensor(k_t, dtype=torch.long), torch.tensor(k_i, dtype=torch.long)
        src_text = index_ranges(t_start[text], k_t)  # rows of text_in.ids, pair after pair
        text_index = index_ranges(starts, k_t)
        image_starts = starts + k_t
        image_index = index_ranges(image_starts, k_i)
        src_regions = index_ranges((torch.tensor([0] + i_len[:-1]).cumsum(0))[image], k_i)
        inner, patches = k_t - 2, k_i - prefix  # caption tokens without [CLS] / [SEP]; image tokens without [CLS]
        pair = torch.arange(k)
        host = {"src_text": src_text, "text_index": text_index, "image_index": image_index,
                "src_regions": src_regions, "image": torch.tensor(image, dtype=torch.long), "cls": starts,
                "labels": torch.tensor(labels, dtype=torch.long), "text_positions": index_ranges(starts + 1, inner),
                "text_pair": torch.repeat_interleave(pair, inner, output_size=int(inner.sum())),
                "image_positions": index_ranges(image_starts + prefix, patches),
                "image_pair": torch.repeat_interleave(pair, patches, output_size=int(patches.sum()))}
    on = {name: x.to(device, non_blocking=True) for name, x in host.items()}
    ids = text_in.ids.index_select(0, on["src_text"])
    pos = text_in.position_ids.index_select(0, on["src_text"])
    if isinstance(vis, ImageInput):
        vision = ImageInput(vis.pixels.index_select(0, on["image"]), None, drop_masked=False, index=on["image_index"])
    elif isinstance(vis, RegionInput):
        src = on["src_regions"]
        vision = RegionInput(vis.features.index_select(0, src), vis.boxes.index_select(0, src),
                             vis.position_ids.index_select(0, src), None, on["image_index"])
    else:
        raise TypeError(f"joint_pairs: unsupported image input {type(vis).__name__}")
    targets = {"itm": PairTargets(
        cls_positions=on["cls"], labels=on["labels"], text_positions=on["text_positions"], text_pair=on["text_pair"],
        image_positions=on["image_positions"], image_pair=on["image_pair"], longest=longest)}
    return PackedBatch(seq.to(device), {"text": TokenInput(ids, pos, text_index), vision_key: vision}, targets,
                       task=batch.task)
