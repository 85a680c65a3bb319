"""Masked token optimisation (model.encoder.mto_layers): the mechanics.

In the first N blocks no token reads a mask-embedding token except that token itself (its key/value
changes nothing elsewhere there); with nothing masked the key-masked block equals the core block;
the option changes nothing for drop-masked images, unmasked batches or N = 0; audio frames and
image-text regions are covered; gradients still reach the mask embedding.
"""
import pytest
import torch

from mmm.batch import FeatureInput, ImageInput, PackedBatch, RegionInput
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import PackedSeqInfo
from mmm.masking.mto import encode_with_mto, keymasked_block, mask_token_rows
from mmm.model import build_model
from mmm.modalities.image.embedder import ImageEmbedder

D = 32


def _enc(**kw):
    base = dict(dim=D, depth=3, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math",
                norm_first=True, final_norm=True, norm_eps=1e-6)
    return EncoderConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"norm_first": False, "final_norm": False}, {"relative_position": "alibi"},
                                {"relative_position": "rotary"}])
def test_keymasked_block_equals_core_block_when_every_token_is_a_key(kw):
    torch.manual_seed(0)
    enc = TransformerEncoder(_enc(**kw))
    seq = PackedSeqInfo.from_seqlens([5, 3, 4])
    x = torch.randn(12, D)
    rope = enc.rotary.tables(seq.position_ids) if enc.rotary is not None else None
    ref = enc.blocks[0](x, seq, "math", enc.alibi, rope)
    out = keymasked_block(enc.blocks[0], x, seq, torch.ones(12, dtype=torch.bool), enc.alibi, rope)
    assert torch.allclose(out, ref, atol=1e-5)
    full = encode_with_mto(enc, x, seq, torch.zeros(12, dtype=torch.bool), 2)  # no mask token: the plain encoder
    assert torch.allclose(full, enc(x, seq), atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"relative_position": "alibi"}])
def test_mask_tokens_are_read_by_no_other_token_in_the_first_blocks(kw):
    torch.manual_seed(0)
    enc = TransformerEncoder(_enc(depth=2, **kw))
    seq = PackedSeqInfo.from_seqlens([5, 4])
    x = torch.randn(9, D)
    hidden = torch.zeros(9, dtype=torch.bool)
    hidden[[1, 3, 6]] = True
    out = encode_with_mto(enc, x, seq, hidden, 2)  # every block blind to the mask tokens
    y = x.clone()
    y[[1, 3, 6]] += torch.randn(3, D)  # change what the mask tokens hold
    out2 = encode_with_mto(enc, y, seq, hidden, 2)
    assert torch.allclose(out[~hidden], out2[~hidden], atol=1e-5)  # visible tokens never read them
    assert not torch.allclose(out[hidden], out2[hidden], atol=1e-3)  # each still reads itself
    one = encode_with_mto(enc, x, seq, hidden, 1)  # later blocks see them again
    assert not torch.allclose(one[~hidden], encode_with_mto(enc, y, seq, hidden, 1)[~hidden], atol=1e-4)
    plain = enc(x, seq)
    assert not torch.allclose(out, plain, atol=1e-4)
    with pytest.raises(ValueError, match="mto_layers"):
        encode_with_mto(enc, x, seq, hidden, 3)


def _image_model(mto, drop_masked=False):
    torch.manual_seed(0)
    emb = ImageEmbedder(D, image_size=16, patch_size=4, cls_token=True, position="sincos")
    obj = ObjectiveConfig("mae") if drop_masked else ObjectiveConfig("simmim")
    return build_model(ModelConfig(encoder=_enc(mto_layers=mto)), [obj], {"image": emb})


def _image_batch(drop_masked=False, masked=True):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    if masked:
        mask[0, [1, 5, 6]] = True
        mask[1, [0, 15]] = True
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    lengths = [1 + int((~m).sum() if drop_masked else m.numel()) for m in mask]
    return PackedBatch(PackedSeqInfo.from_seqlens(lengths), {"image": ImageInput(pixels, mask, drop_masked)})


def test_image_rows_and_model_wiring():
    batch = _image_batch()
    model = _image_model(2)
    rows = mask_token_rows(batch, model.embedders)
    assert rows.nonzero().squeeze(1).tolist() == [2, 6, 7, 18, 33]  # [CLS] first in each image of 17 tokens
    plain = _image_model(0)
    assert torch.equal(plain.state_dict()["encoder.blocks.0.attn.qkv.weight"], model.state_dict()["encoder.blocks.0.attn.qkv.weight"])
    h_mto, h_plain = model.encode(batch), plain.encode(batch)
    assert not torch.allclose(h_mto, h_plain, atol=1e-4)
    # the mask embedding is still trained (the mask tokens read themselves and feed the head)
    loss, _ = model(batch)
    loss.backward()
    assert model.embedders["image"].mask_token.grad.abs().sum() > 0
    # nothing masked, or drop-masked images: the plain encoder
    clean = _image_batch(masked=False)
    assert mask_token_rows(clean, model.embedders) is None
    assert torch.allclose(model.encode(clean), plain.encode(clean), atol=1e-6)
    dropped = _image_batch(drop_masked=True)
    assert mask_token_rows(dropped, model.embedders) is None


def test_audio_frames_and_regions_are_covered():
    feats = FeatureInput(torch.randn(6, 4), torch.arange(6), torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.bool))
    batch = PackedBatch(PackedSeqInfo.from_seqlens([6]), {"audio": feats})
    assert mask_token_rows(batch, {}).nonzero().squeeze(1).tolist() == [1, 2, 5]
    regions = RegionInput(torch.randn(3, 8), torch.rand(3, 7), torch.arange(3), torch.tensor([False, True, False]),
                          index=torch.tensor([4, 5, 6]))  # regions after a 4-token caption in the stream
    batch = PackedBatch(PackedSeqInfo.from_seqlens([7]), {"regions": regions})
    assert mask_token_rows(batch, {}).nonzero().squeeze(1).tolist() == [5]


def test_config_refuses_negative_layers():
    from mmm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="mto_layers"):
        load_config(None, {"model.encoder.mto_layers": -1})


@pytest.mark.parametrize("kw", [{}, {"relative_position": "alibi"}])
def test_keymasked_attention_with_dropout_takes_the_explicit_cpu_path(kw):
    """Attention dropout on CPU runs :func:`mmm.core.attention.attend`'s explicit softmax; at a dropout of
    1e-7 the key-masked block must equal its dropout-free output (padding rows keep their own key)."""
    torch.manual_seed(0)
    enc = TransformerEncoder(_enc(depth=1, **kw))
    seq = PackedSeqInfo.from_seqlens([5, 2, 4])
    x = torch.randn(11, D)
    hidden = torch.zeros(11, dtype=torch.bool)
    hidden[[1, 3, 9]] = True
    block = enc.blocks[0].eval()
    want = keymasked_block(block, x, seq, ~hidden, enc.alibi, None)
    block.train()
    block.attn.attn_dropout = 1e-7
    got = keymasked_block(block, x, seq, ~hidden, enc.alibi, None)
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
