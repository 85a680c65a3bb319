"""Image embedder (patches, [CLS], positions, MAE/SimMIM masking) and the standalone ImageEncoder."""
from __future__ import annotations

import pytest
import torch

from mmm.config import EncoderConfig, from_dict, to_dict
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import PackedSeqInfo
from mmm.modalities.image.embedder import ImageEmbedder, ImageEncoder, ImageEncoderConfig, sincos_2d_table, visible_slots
from mmm.registry import EMBEDDERS

DIM = 64
TINY = dict(image_size=32, patch_size=8)  # a 4x4 grid, 16 patches


def _images(b: int = 3, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(b: int, p: int, seed: int = 0) -> torch.Tensor:
    """Random masks with a different number of hidden patches per image (at least one visible)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, p, dtype=torch.bool)
    for i in range(b):
        hidden = torch.randperm(p, generator=g)[: (p * (i + 1)) // (b + 1)]
        mask[i, hidden] = True
    return mask


def _encoder_cfg(**kw) -> EncoderConfig:
    base = dict(dim=DIM, depth=2, heads=4, mlp_hidden=128, norm_first=True, final_norm=True, norm_eps=1e-6,
                dropout=0.0, attn_dropout=0.0)
    return EncoderConfig(**{**base, **kw})


def test_registered_and_shapes():
    emb = EMBEDDERS.create("image", dim=DIM, **TINY)
    assert isinstance(emb, ImageEmbedder)
    assert emb.grid == (4, 4) and emb.num_patches == 16 and emb.num_prefix_tokens == 1
    assert emb.pos_embed.shape == (1, 17, DIM) and emb.cls_token.shape == emb.mask_token.shape == (1, 1, DIM)
    x = _images()
    tokens, lengths = emb(x)
    assert tokens.shape == (3 * 17, DIM)
    assert lengths.dtype == torch.int64 and lengths.tolist() == [17, 17, 17]
    cls = (emb.cls_token + emb.pos_embed[:, 0])[0, 0]
    for i in range(3):
        torch.testing.assert_close(tokens[i * 17], cls)
        torch.testing.assert_close(tokens[i * 17 + 1: (i + 1) * 17], emb.patch_tokens(x)[i])
    no_cls = ImageEmbedder(DIM, cls_token=False, **TINY)
    assert no_cls.num_prefix_tokens == 0 and no_cls.cls_token is None and no_cls.pos_embed.shape == (1, 16, DIM)
    assert no_cls(x)[1].tolist() == [16, 16, 16]


def test_patch_tokens_are_row_major_linear_patches():
    """Reference: cut patches by hand (row-major grid, channel-major inside a patch), apply the conv as a Linear."""
    emb = ImageEmbedder(DIM, **TINY)
    x = _images(2)
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, C, gh, gw, 8, 8)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 8 * 8)  # (B, P, C*p*p)
    w = emb.patch_embed.proj.weight.reshape(DIM, -1)
    expected = patches @ w.T + emb.patch_embed.proj.bias + emb.pos_embed[:, 1:]
    torch.testing.assert_close(emb.patch_tokens(x), expected, atol=1e-5, rtol=1e-5)


def test_drop_masked_keeps_visible_patches_in_order_and_indexes_them():
    emb = ImageEmbedder(DIM, **TINY)
    x, mask = _images(3), _mask(3, 16)
    full = emb.patch_tokens(x)  # (B, P, d)
    tokens, lengths = emb(x, mask, drop_masked=True)
    visible = (~mask).sum(1)
    assert lengths.tolist() == (visible + 1).tolist() and len(set(lengths.tolist())) == 3
    assert tokens.shape == (int(lengths.sum()), DIM)
    idx = emb.visible_index(mask)
    assert idx.image.shape == idx.patch.shape == (tokens.shape[0],)
    cls = (emb.cls_token + emb.pos_embed[:, 0])[0, 0]
    start = 0
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(tokens[start], cls)
        torch.testing.assert_close(tokens[start + 1: start + n], full[i][~mask[i]])
        assert idx.image[start: start + n].tolist() == [i] * n
        assert idx.patch[start: start + n].tolist() == [-1] + torch.nonzero(~mask[i])[:, 0].tolist()
        start += n
    # scatter back onto the full (B, 1+P) grid, as an MAE decoder does
    grid = torch.zeros(3 * 17, DIM)
    grid[idx.image * 17 + 1 + idx.patch] = tokens
    grid = grid.view(3, 17, DIM)
    torch.testing.assert_close(grid[:, 1:][~mask], full[~mask])
    assert bool((grid[:, 1:][mask] == 0).all())
    # without [CLS]
    plain = ImageEmbedder(DIM, cls_token=False, **TINY)
    t2, l2 = plain(x, mask, drop_masked=True)
    assert l2.tolist() == visible.tolist()
    torch.testing.assert_close(t2, plain.patch_tokens(x)[~mask])
    assert bool((plain.visible_index(mask).patch >= 0).all())
    # the slots a head computes from the mask alone (no embedder at hand) are the same, with and without [CLS]
    for e, prefix in ((emb, 1), (plain, 0)):
        i = e.visible_index(mask)
        assert visible_slots(mask, prefix).tolist() == (i.image * (16 + prefix) + prefix + i.patch).tolist()


def test_mask_token_replaces_hidden_patches_simmim():
    emb = ImageEmbedder(DIM, **TINY)
    x, mask = _images(2), _mask(2, 16, seed=1)
    tokens, lengths = emb(x, mask)  # drop_masked=False: every position stays
    assert lengths.tolist() == [17, 17]
    patches = tokens.view(2, 17, DIM)[:, 1:]
    hidden = (emb.mask_token + emb.pos_embed[:, 1:]).expand(2, -1, -1)
    torch.testing.assert_close(patches[mask], hidden[mask])
    torch.testing.assert_close(patches[~mask], emb.patch_tokens(x)[~mask])


def test_sincos_positions_match_timm_mae_layout():
    timm_pos = pytest.importorskip("timm.layers.pos_embed_sincos")
    emb = ImageEmbedder(DIM, position="sincos", **TINY)
    assert "pos_embed" not in dict(emb.named_parameters()) and "embedder.pos_embed" not in emb.state_dict()
    assert bool((emb.pos_embed[0, 0] == 0).all())  # [CLS] row
    # timm's table in MAE order: (column, row) coordinates, [sin | cos] per coordinate, flattened column-major
    ref = timm_pos.build_sincos2d_pos_embed([4, 4], DIM, reverse_coord=True, interleave_sin_cos=True)
    ref = ref.view(4, 4, DIM).transpose(0, 1).reshape(16, DIM)  # → row-major patch order
    torch.testing.assert_close(emb.pos_embed[0, 1:], ref, atol=1e-6, rtol=1e-6)
    # spot check the formula: patch (row 2, col 3), channel k of the column half
    t = sincos_2d_table((4, 4), DIM)
    k = 5
    omega = 10000.0 ** (-k / (DIM // 4))
    assert t[2 * 4 + 3, k].item() == pytest.approx(torch.sin(torch.tensor(3 * omega)).item(), abs=1e-6)
    row_cos = t[2 * 4 + 3, DIM // 2 + DIM // 4 + k].item()
    assert row_cos == pytest.approx(torch.cos(torch.tensor(2 * omega)).item(), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        ImageEmbedder(66, position="sincos", **TINY)


def test_reset_parameters_follows_mae():
    emb = ImageEmbedder(512, image_size=32, patch_size=8)
    w = emb.patch_embed.proj.weight.detach().view(512, -1)
    bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    assert bool((emb.patch_embed.proj.bias == 0).all())
    for p in (emb.cls_token, emb.mask_token):
        assert 0.015 < float(p.detach().std()) < 0.025
    assert float(emb.pos_embed.detach().abs().max()) <= 0.04 + 1e-6


def test_embed_norm_and_dropout():
    emb = ImageEmbedder(DIM, embed_norm=True, norm_eps=1e-5, dropout=0.5, **TINY).eval()
    tokens, _ = emb(_images(1))
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(17), atol=1e-5, rtol=0)
    assert emb.norm.eps == 1e-5
    emb.train()
    assert bool((emb(_images(1))[0] == 0).any())


def test_input_errors_are_clear():
    emb = ImageEmbedder(DIM, **TINY)
    with pytest.raises(ValueError, match=r"are 48x48 but this embedder expects 32x32"):
        emb(_images(1, size=48))
    with pytest.raises(ValueError, match=r"not even divisible by patch_size=8"):
        emb(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"positive multiple of patch_size=6"):
        ImageEmbedder(DIM, image_size=32, patch_size=6)
    with pytest.raises(ValueError, match="1 channels but this embedder expects in_chans=3"):
        emb(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        emb(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        emb(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(batch, num_patches\) = \(2, 16\)"):
        emb(_images(2), torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        emb(_images(2), torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown image position"):
        ImageEmbedder(DIM, position="sinusoidal", **TINY)
    plain = ImageEmbedder(DIM, cls_token=False, **TINY)
    all_hidden = torch.zeros(2, 16, dtype=torch.bool)
    all_hidden[1] = True
    with pytest.raises(ValueError, match="image 1 has every patch masked"):
        plain(_images(2), all_hidden, drop_masked=True)


def test_packed_variable_lengths_equal_encoding_each_image_alone():
    """MAE mode: images with different visible counts, packed, match encoding each image on its own."""
    emb = ImageEmbedder(DIM, **TINY)
    enc = TransformerEncoder(_encoder_cfg(attention="math")).eval()
    x, mask = _images(3), _mask(3, 16)
    with torch.no_grad():
        tokens, lengths = emb(x, mask, drop_masked=True)
        packed = enc(tokens, PackedSeqInfo.from_seqlens(lengths.tolist()))
        start = 0
        for i, n in enumerate(lengths.tolist()):
            alone_tokens, alone_len = emb(x[i: i + 1], mask[i: i + 1], drop_masked=True)
            alone = enc(alone_tokens, PackedSeqInfo.from_seqlens(alone_len.tolist()))
            torch.testing.assert_close(packed[start: start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_image_encoder_build_and_forward():
    enc = ImageEncoder.build(_encoder_cfg(), **TINY).eval()
    assert isinstance(enc.config, ImageEncoderConfig) and enc.hidden_size == DIM and enc.num_prefix_tokens == 1
    x = _images(2)
    with torch.no_grad():
        out = enc(x)
        tokens, lengths = enc.embedder(x)
        ref = enc.encoder(tokens, PackedSeqInfo.from_seqlens(lengths.tolist())).view(2, 17, DIM)
    assert out.shape == (2, 17, DIM)
    torch.testing.assert_close(out, ref)
    plain = ImageEncoder.build(_encoder_cfg(), cls_token=False, position="sincos", **TINY)
    assert plain(x).shape == (2, 16, DIM)
    cfg = from_dict(ImageEncoderConfig, to_dict(enc.config))  # plain data round trip, for saving
    assert cfg == enc.config
    rebuilt = ImageEncoder.from_config(cfg)
    assert set(rebuilt.state_dict()) == set(enc.state_dict())


def test_image_encoder_errors():
    with pytest.raises(TypeError, match=r"unknown image embedder argument\(s\) \['img_size'\]"):
        ImageEncoder.build(_encoder_cfg(), img_size=32)
    with pytest.raises(TypeError, match="encoder_cfg.dim"):
        ImageEncoder.build(_encoder_cfg(), dim=32)
    with pytest.raises(ValueError, match="does not match encoder dim"):
        ImageEncoder(ImageEmbedder(32, **TINY), TransformerEncoder(_encoder_cfg()), ImageEncoderConfig())
    enc = ImageEncoder.build(_encoder_cfg(), **TINY)
    with pytest.raises(ValueError, match=r"images must be a \(batch, channels, height, width\) tensor"):
        enc([[0.0]])
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="images has 4 channels"):
        enc(torch.randn(1, 4, 32, 32))
