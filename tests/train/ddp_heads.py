"""Two gloo ranks under DDP, each on its part of one batch, for an image MAE and an audio model;
driven by test_ddp.py, which compares them with one process on the whole batch.

    python tests/train/ddp_heads.py OUT   (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

Every case builds its model from a fixed seed (the same weights on every rank) and its whole batch
deterministically; rank ``r`` trains on the sequences ``PARTS[r]`` of it (unequal parts, so the
ranks hold different numbers of hidden patches / frames). Each rank runs one forward and backward
through ``DistributedDataParallel`` and writes ``OUT/{case}_rank{R}.pt``: its loss, its heads'
losses and counts, and the gradients after DDP's all-reduce.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mmm.batch import FeatureInput, ImageInput, PackedBatch, TokenTargets  # noqa: E402
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig  # noqa: E402
from mmm.core.packing import PackedSeqInfo  # noqa: E402
from mmm.model import build_model  # noqa: E402

PARTS = [(0, 1), (1, 4)]  # rank r trains on sequences PARTS[r][0] .. PARTS[r][1] - 1 of the whole batch
DIM = 32


def _encoder() -> EncoderConfig:
    return EncoderConfig(dim=DIM, depth=1, heads=2, mlp_hidden=64, norm_first=True, final_norm=True, norm_eps=1e-6,
                         dropout=0.0, attn_dropout=0.0, attention="math")


# ------------------------------------------------------------------ image MAE: 4 images, 16 patches each


def image_model() -> nn.Module:
    from mmm.modalities.image.embedder import ImageEmbedder

    torch.manual_seed(0)
    emb = ImageEmbedder(DIM, image_size=16, patch_size=4, cls_token=True, position="sincos")
    mae = ObjectiveConfig("mae", 1.0, {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2})
    return build_model(ModelConfig(encoder=_encoder()), [mae], {"image": emb})


def image_batch(part: Tuple[int, int]) -> PackedBatch:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(4, 3, 16, 16, generator=g)
    hidden_counts = (12, 7, 10, 5)  # different per image: per-rank means would weigh patches unequally
    mask = torch.zeros(4, 16, dtype=torch.bool)
    for i, k in enumerate(hidden_counts):
        mask[i, torch.randperm(16, generator=g)[:k]] = True
    a, b = part
    lengths = [1 + int((~m).sum()) for m in mask[a:b]]  # [CLS] + visible patches (MAE drops the hidden ones)
    return PackedBatch(PackedSeqInfo.from_seqlens(lengths), {"image": ImageInput(pixels[a:b], mask[a:b], True)})


# ------------------------------------------------------------------ audio: masked frames, two heads


def audio_model() -> nn.Module:
    from mmm.modalities.audio.embedder import AudioEmbedder

    torch.manual_seed(0)
    emb = AudioEmbedder(feature_dim=6, dim=DIM, max_len=16, dropout=0.0)
    heads = [ObjectiveConfig("masked_features", 1.0, {"modality": "audio"}),
             ObjectiveConfig("token_targets", 0.5, {"target": "audio_mfcc", "num_classes": 8})]
    return build_model(ModelConfig(encoder=_encoder()), heads, {"audio": emb})


def audio_batch(part: Tuple[int, int]) -> PackedBatch:
    g = torch.Generator().manual_seed(2)
    clips: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for length, hidden in ((9, 4), (6, 2), (11, 6), (7, 3)):
        features = torch.randn(length, 6, generator=g)
        mask = torch.zeros(length, dtype=torch.bool)
        mask[torch.randperm(length, generator=g)[:hidden]] = True
        clips.append((features, mask, torch.randint(0, 8, (length,), generator=g)))  # a cluster id per frame
    clips = clips[part[0]:part[1]]
    seq = PackedSeqInfo.from_seqlens([len(f) for f, _, _ in clips])
    features = torch.cat([f for f, _, _ in clips])
    mask = torch.cat([m for _, m, _ in clips])
    labels = torch.cat([c for _, _, c in clips])
    positions = mask.nonzero().squeeze(1)  # HuBERT: predict the cluster ids of the hidden frames
    return PackedBatch(seq, {"audio": FeatureInput(features, seq.position_ids, mask)},
                       {"audio_mfcc": TokenTargets(positions, labels[positions])})


CASES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[Sequence[int]], PackedBatch]]] = {
    "image_mae": (image_model, image_batch),
    "audio": (audio_model, audio_batch),
}


def step(model: nn.Module, batch: PackedBatch) -> dict:
    """One forward and backward; the loss, each head's loss and count, and the parameters' gradients."""
    model.train()
    model.zero_grad()
    loss, outputs = model(batch)
    loss.backward()
    inner = getattr(model, "module", model)
    return {"loss": float(loss.detach()),
            "heads": {n: (float(o.loss.detach()), o.count) for n, o in outputs.items()},
            "grads": {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    for name, (make_model, make_batch) in CASES.items():
        model = nn.parallel.DistributedDataParallel(make_model(), find_unused_parameters=True)
        torch.save(step(model, make_batch(PARTS[rank])), out / f"{name}_rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
