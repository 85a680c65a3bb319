"""Image encoders out of MAE checkpoints: same features as the trained model, save/load, timm export."""
from pathlib import Path

import pytest
import torch

from mmm import load_encoder
from mmm.batch import ImageInput, PackedBatch
from mmm.core.packing import PackedSeqInfo
from mmm.encoders import read_checkpoint, save_encoder
from mmm.modalities.image.embedder import ImageEncoder
from mmm.train.pretrain import build_model_for, modality_from_checkpoint


def _images(n=3, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_image_encoder_from_checkpoint_matches_the_trained_model(image_ckpt: Path):
    enc = load_encoder(image_ckpt, modality="image")
    assert isinstance(enc, ImageEncoder) and not enc.training
    contents = read_checkpoint(image_ckpt)
    model = build_model_for(contents.config, modality_from_checkpoint(contents))
    model.load_state_dict(contents.state_dict)
    model.eval()
    x = _images()
    t = 1 + (16 // 4) ** 2
    batch = PackedBatch(PackedSeqInfo.from_seqlens([t] * 3), {"image": ImageInput(x)})
    with torch.no_grad():
        ref = model.encode(batch).view(3, t, -1)
        out = enc(x)
    assert out.shape == (3, t, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # trained weights were loaded, not a fresh init
    assert torch.equal(enc.embedder.patch_embed.proj.weight,
                       contents.state_dict["embedders.image.patch_embed.proj.weight"])


def test_saved_image_encoder_round_trips_and_exports_to_timm(image_ckpt: Path, tmp_path):
    enc = load_encoder(image_ckpt, modality="image")
    out = save_encoder(enc, tmp_path / "enc")
    back = load_encoder(out, modality="image")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(back(x), enc(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="holds a 'image' encoder, but modality='text'"):
        load_encoder(out, modality="text")
    from mmm.interop.timm import to_timm_model

    timm_vit = to_timm_model(enc)
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.forward_features(x), enc(x), atol=1e-4, rtol=0)


def test_text_checkpoint_has_no_image_encoder(ckpt: Path):
    with pytest.raises(ValueError, match="no 'image' embedder"):
        load_encoder(ckpt, modality="image")


def test_image_encoder_trained_with_xformers_runs_on_cpu(image_ckpt: Path, tmp_path, monkeypatch):
    monkeypatch.delenv("MMM_ATTENTION", raising=False)
    raw = torch.load(image_ckpt, map_location="cpu", weights_only=True)
    raw["mmm"]["config"]["model"]["encoder"]["attention"] = "xformers"
    src = tmp_path / "xformers.ckpt"
    torch.save(raw, src)
    x = _images()
    with torch.no_grad():
        ref = load_encoder(image_ckpt, modality="image")(x)
        enc = load_encoder(src, modality="image")
        assert enc.config.encoder.attention == "auto"
        torch.testing.assert_close(enc(x), ref, atol=0, rtol=0)
        saved = save_encoder(load_encoder(src, modality="image", attention=None), tmp_path / "enc")
        torch.testing.assert_close(load_encoder(saved, modality="image")(x), ref, atol=0, rtol=0)
