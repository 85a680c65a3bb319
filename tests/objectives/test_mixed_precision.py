"""Scores that bf16 autocast must not round: contrastive logits (temperature up to 100), WRA's cosine costs, the
image residual stream, and accuracy ties on half-precision logits (each checked under CPU bf16 autocast)."""
from __future__ import annotations

import sys
from pathlib import Path

import math

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from test_image_text_pipeline import run, settings, shards, tok  # noqa: E402,F401  (fixtures)

from mmm.objectives.base import top1_accuracy  # noqa: E402
from mmm.objectives.optimal_transport import cosine_cost  # noqa: E402
from mmm.registry import EMBEDDERS  # noqa: E402

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_the_contrastive_loss_is_computed_in_fp32_under_autocast(shards, tok):
    """open_clip's logits (scale x image @ text.T) came out of a bf16 matmul: at CLIP's cap of 100 a logit is
    rounded by up to 0.25, and the loss moved by about 2%."""
    from test_itm_hard import _vl_model

    torch.manual_seed(0)
    itc = run(shards, tok, settings("itc", "regions"), batch_size=8)[0]
    model = _vl_model("regions", tok.vocab_size, "batch").eval()
    head = model.objectives["itc"]
    with torch.no_grad():
        head.logit_scale.fill_(math.log(100.0))
        hidden = model.encode(itc)
        with torch.autocast(**BF16):
            out = head(hidden, itc)
            image, text = head.embed_pairs(hidden, itc.targets["itc"])  # the projections do run in bf16
        logits = 100.0 * image.float() @ text.float().T  # what the loss should score: fp32 logits of those embeddings
        truth = torch.arange(logits.shape[0])
        ref = 0.5 * (torch.nn.functional.cross_entropy(logits, truth) + torch.nn.functional.cross_entropy(logits.T, truth))
    assert out.loss.dtype == torch.float32
    assert abs(float(out.loss) - float(ref)) <= 1e-5 * float(ref)
    assert float(out.metrics["i2t_acc"]) == float((logits.argmax(1) == truth).float().mean())


def test_wra_costs_are_fp32_under_autocast():
    torch.manual_seed(0)
    x, y = torch.randn(2, 7, 64), torch.randn(2, 5, 64)
    ref = cosine_cost(x, y)
    with torch.autocast(**BF16):
        out = cosine_cost(x, y)
    assert out.dtype == torch.float32 and float((out - ref).abs().max()) <= 1e-6


def test_the_image_residual_stream_is_fp32_under_autocast():
    """The fp32 position table was cast to the conv's bf16 output, so every residual add of an image model
    (embed_norm off, pre-LN) stayed in bf16."""
    emb = EMBEDDERS.create("image", dim=32, image_size=16, patch_size=4)
    pixels = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True
    with torch.autocast(**BF16):
        tokens, _ = emb(pixels)
        masked, _ = emb(pixels, mask)
    assert tokens.dtype == masked.dtype == torch.float32


def test_half_precision_logits_share_tied_top_scores():
    """bf16 logits tie often; in training the cheap form counted a tie as a hit (0.5 points too many)."""
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 1])
    assert float(top1_accuracy(logits, labels)) == 1.0  # fp32, training: the cheap form
    assert float(top1_accuracy(logits.bfloat16(), labels)) == 0.75
    assert float(top1_accuracy(logits, labels, share_ties=True)) == 0.75
