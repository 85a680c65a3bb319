"""MAE / SimMIM / visual-token heads on real image batches from the image pipeline."""
import re
import numpy as np
import pytest
import torch

from mmm.batch import ImageInput, PackedBatch
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.core.packing import PackedSeqInfo
from mmm.model import build_model
from mmm.modalities.image.embedder import ImageEmbedder
from mmm.objectives.mim import normalize_patches, patchify, unpatchify


def _model(objectives, drop_masked=True, cls=True):
    enc = EncoderConfig(dim=32, depth=1, heads=2, mlp_hidden=64, norm_first=True, final_norm=True, norm_eps=1e-6,
                        dropout=0.0, attn_dropout=0.0, attention="math")
    emb = ImageEmbedder(32, image_size=16, patch_size=4, cls_token=cls, position="sincos")
    return build_model(ModelConfig(encoder=enc), objectives, {"image": emb})


def _batch(mask, drop_masked, cls=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(mask.shape[0], 3, 16, 16, generator=g)
    prefix = 1 if cls else 0
    lengths = [prefix + int((~m).sum() if drop_masked else m.numel()) for m in mask]
    return PackedBatch(PackedSeqInfo.from_seqlens(lengths), {"image": ImageInput(pixels, mask, drop_masked)})


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    # patch 1 is the top-right 4x4 block, channels last inside the patch
    assert torch.equal(p[0, 1].view(4, 4, 3).permute(2, 0, 1), x[0, :, 0:4, 4:8])
    assert torch.equal(unpatchify(p, 4, 3, (2, 2)), x)
    n = normalize_patches(p)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 4), atol=1e-4)


@pytest.mark.parametrize("cls", [True, False])
def test_mae_scores_hidden_patches_only_and_learns(cls):
    torch.manual_seed(0)
    model = _model([ObjectiveConfig("mae", 1.0, {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2})], cls=cls)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :12] = True  # 75% hidden, same count per image
    mask[1] = mask[1].flip(0)
    batch = _batch(mask, True, cls)
    loss, out = model(batch)
    assert out["mae"].count == 36 and torch.isfinite(loss)
    # changing the pixels of a *visible* patch in the target must not change which targets are scored:
    pred, m = model.objectives["mae"].decode(model.encode(batch), batch)
    assert pred.shape == (3, 16, 48) and torch.equal(m, mask)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = float(loss)
    for _ in range(60):
        opt.zero_grad()
        l, _ = model(batch)
        l.backward()
        opt.step()
    assert float(l) < 0.7 * first


def test_mae_decoder_accepts_variable_visible_counts():
    model = _model([ObjectiveConfig("mae", 1.0, {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2})])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 3:7] = True  # block masks hide different counts per image
    loss, out = model(_batch(mask, True))
    assert out["mae"].count == 14 and torch.isfinite(loss)


def test_simmim_needs_mask_token_mode_and_regresses_hidden_pixels():
    model = _model([ObjectiveConfig("simmim", 1.0, {})])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    loss, out = model(_batch(mask, False))
    assert out["simmim"].count == 16 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="mask-token mode"):
        model(_batch(mask, True))


@pytest.mark.parametrize("args,message", [
    ({"decoder_dim": 16, "decoder_heads": 3}, "objective mae: decoder_dim 16 is not divisible by decoder_heads 3"),
    ({"decoder_dim": -4}, "objective mae: decoder_dim must be an integer >= 1, got -4"),
    ({"decoder_depth": 0}, "objective mae: decoder_depth must be an integer >= 1, got 0"),
    ({"decoder_heads": "4"}, "objective 'mae' (its args): decoder_heads must be int, got '4' (a quoted YAML value is "
                             "a string)"),  # refused by type when the args are checked
])
def test_mae_decoder_arguments_are_checked_naming_the_objective_s_own_keys(args, message):
    from mmm.registry import RegistryError

    with pytest.raises((ValueError, RegistryError), match=re.escape(message)):
        _model([ObjectiveConfig("mae", 1.0, args)])
