"""Tests for the masked_features objective: MSE at hidden tokens only, per-token normalised targets,
inputs left intact by the embedder, clear errors."""
from __future__ import annotations

import pytest
import torch

from mmm.batch import FeatureInput, PackedBatch, TokenInput
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.core.packing import PackedSeqInfo
from mmm.model import build_model
from mmm.modalities.audio.embedder import AudioEmbedder
from mmm.objectives.feature_regression import MaskedFeatureRegression, normalize_tokens
from mmm.registry import OBJECTIVES

F_DIM, D = 6, 16


def feature_batch(mask=True) -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    seq = PackedSeqInfo.from_seqlens([5, 3])
    m = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool) if mask else None
    return PackedBatch(seq, {"audio": FeatureInput(torch.randn(8, F_DIM, generator=g), seq.position_ids, m)})


def head(**kw) -> MaskedFeatureRegression:
    emb = AudioEmbedder(feature_dim=F_DIM, dim=D, max_len=8)
    return OBJECTIVES.create("masked_features", dim=D, embedders={"audio": emb}, encoder_cfg=EncoderConfig(dim=D), **kw)


def test_loss_is_the_mse_of_hidden_tokens_only() -> None:
    h, batch = head(), feature_batch()
    hidden = torch.randn(8, D, requires_grad=True)
    out = h(hidden, batch)
    mask, feats = batch.inputs["audio"].mask, batch.inputs["audio"].features
    expected = ((h.head(hidden[mask]) - feats[mask]) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.count == 4
    out.loss.backward()
    assert hidden.grad[~mask].abs().sum() == 0 and hidden.grad[mask].abs().sum() > 0


def test_norm_targets_standardise_each_token_and_mlp_head() -> None:
    h = head(norm_targets=True, hidden=32)
    assert isinstance(h.head, torch.nn.Sequential)
    t = h.target(torch.randn(4, F_DIM) * 5 + 3)
    torch.testing.assert_close(t.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(-1), torch.ones(4), atol=1e-4, rtol=0)
    r = 2 ** -0.5  # unbiased std of (1, 3) is sqrt(2), as MAE's norm_pix_loss
    torch.testing.assert_close(normalize_tokens(torch.tensor([[1.0, 3.0]])), torch.tensor([[-r, r]]), atol=1e-5, rtol=0)


def test_a_perfect_prediction_has_zero_loss() -> None:
    h, batch = head(), feature_batch()
    with torch.no_grad():  # a head that is the identity on the first F_DIM dims of the hidden states
        h.head.weight.zero_()
        h.head.weight[:, :F_DIM] = torch.eye(F_DIM)
        h.head.bias.zero_()
    hidden = torch.cat([batch.inputs["audio"].features, torch.zeros(8, D - F_DIM)], dim=1)
    assert float(h(hidden, batch).loss.detach()) == 0.0


def test_no_mask_gives_a_zero_loss_with_no_count() -> None:
    out = head()(torch.randn(8, D, requires_grad=True), feature_batch(mask=False))
    assert out.count == 0 and float(out.loss.detach()) == 0.0 and out.loss.requires_grad


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="no feature-token embedder named 'audio'"):
        OBJECTIVES.create("masked_features", dim=D, embedders={"text": torch.nn.Embedding(3, D)})
    seq = PackedSeqInfo.from_seqlens([2])
    batch = PackedBatch(seq, {"text": TokenInput(torch.tensor([1, 2]), seq.position_ids)})
    with pytest.raises(ValueError, match="needs a feature input named 'audio'"):
        head()(torch.randn(2, D), batch)


def test_inside_a_model_the_targets_are_the_untouched_inputs() -> None:
    cfg = ModelConfig(encoder=EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=32, dropout=0.0, attn_dropout=0.0))
    emb = AudioEmbedder(feature_dim=F_DIM, dim=D, max_len=8, dropout=0.0)
    model = build_model(cfg, [ObjectiveConfig("masked_features", args={"modality": "audio"})], {"audio": emb})
    batch = feature_batch()
    before = batch.inputs["audio"].features.clone()
    loss, outputs = model(batch)
    assert torch.equal(batch.inputs["audio"].features, before)
    assert outputs["masked_features"].count == 4 and torch.isfinite(loss)
    loss.backward()
    assert emb.mask_embedding.grad.abs().sum() > 0
