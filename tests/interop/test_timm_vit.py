"""timm ViT interop: export and import parity on forward features, weight files, refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from mmm.config import EncoderConfig  # noqa: E402
from mmm.interop.timm import export_timm_vit, import_timm_vit, load_timm_encoder, to_timm_model  # noqa: E402
from mmm.modalities.image.embedder import ImageEncoder  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
NAME = "vit_tiny_patch16_224"
TOL = 1e-4


def _timm_vit(**kw) -> torch.nn.Module:
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **{**TINY, **kw})
    _perturb(model)
    return model.eval()


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random norm affines, biases, layer scales and tokens, so a dropped or swapped one cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm_pre.weight", "gamma")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _max_diff(timm_model: torch.nn.Module, enc: ImageEncoder) -> float:
    x = _images()
    with torch.no_grad():
        ref, out = timm_model.forward_features(x), enc(x)
    assert ref.shape == out.shape
    return float((ref - out).abs().max())


def _mmm_encoder(encoder_kw=None, **embedder_kw) -> ImageEncoder:
    cfg = dict(dim=64, depth=2, heads=4, mlp_hidden=128, norm_first=True, final_norm=True, norm_eps=1e-6,
               dropout=0.0, attn_dropout=0.0)
    enc = ImageEncoder.build(EncoderConfig(**{**cfg, **(encoder_kw or {})}), **{"image_size": 32, "patch_size": 8,
                                                                              **embedder_kw})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return enc.eval()


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="cls-token"),
    pytest.param(dict(class_token=False, global_pool="avg"), id="avg-pool-no-cls"),
    pytest.param(dict(qkv_bias=False, init_values=1e-5, no_embed_class=True), id="deit3-layerscale-no-embed-class"),
    pytest.param(dict(pre_norm=True, final_norm=False, mlp_ratio=3.0), id="clip-pre-norm"),
])
def test_import_parity(kw):
    model = _timm_vit(**kw)
    enc = import_timm_vit(model)
    assert not enc.training and enc.config.encoder.norm_first and enc.config.encoder.norm_eps == 1e-6
    assert _max_diff(model, enc) <= TOL


def test_import_parity_math_attention():
    model = _timm_vit()
    enc = import_timm_vit(model)
    enc.encoder.cfg.attention = "math"
    assert enc.encoder.backend_for(torch.device("cpu")) == "math"
    assert _max_diff(model, enc) <= TOL


def test_import_then_export_reproduces_the_timm_weights():
    model = _timm_vit()
    kwargs, state = export_timm_vit(import_timm_vit(model))
    assert kwargs["embed_dim"] == 64 and kwargs["class_token"] and kwargs["num_classes"] == 0
    theirs = model.state_dict()
    assert set(state) == set(theirs)
    for k, v in state.items():
        torch.testing.assert_close(v, theirs[k], atol=0, rtol=0, msg=k)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("encoder_kw,embedder_kw", [
    pytest.param({}, {}, id="cls-token"),
    pytest.param({}, dict(cls_token=False), id="no-cls"),
    pytest.param(dict(attention="math", qkv_bias=False, mlp_hidden=96), dict(position="sincos"), id="math-sincos"),
    pytest.param(dict(norm_eps=1e-5, final_norm=False), dict(embed_norm=True, norm_eps=1e-5), id="pre-norm-eps"),
])
def test_export_parity(encoder_kw, embedder_kw):
    enc = _mmm_encoder(encoder_kw, **embedder_kw)
    model = to_timm_model(enc)
    assert type(model).__name__ == "VisionTransformer" and not model.training
    assert model.num_prefix_tokens == enc.num_prefix_tokens
    assert _max_diff(model, enc) <= TOL
    back = import_timm_vit(model)  # and back again
    assert _max_diff(model, back) <= TOL


def test_the_exported_model_tells_timm_the_preprocessing_mmm_trained_with():
    """It carried vit_base_patch16_224's settings: timm's own transform made 224-px, mean/std-0.5 inputs for a
    32-px encoder trained on ImageNet-normalised images (a shape error, or silently wrong inputs at 224 px)."""
    import numpy as np
    from PIL import Image

    from mmm.modalities.image.transforms import eval_transform, normalize

    enc = _mmm_encoder()
    model = to_timm_model(enc)
    data_cfg = timm.data.resolve_model_data_config(model)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["mean"] == (0.485, 0.456, 0.406)
    assert data_cfg["std"] == (0.229, 0.224, 0.225) and data_cfg["crop_pct"] == 1.0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    timm_input = timm.data.create_transform(**data_cfg)(img)[None]  # timm's own eval transform
    mmm_input = normalize(eval_transform(img, 32))[None]
    assert float((timm_input - mmm_input).abs().max()) < 0.05  # the same resize/crop/normalisation (PIL vs torch)
    with torch.no_grad():
        assert float((model.forward_features(timm_input) - enc(timm_input)).abs().max()) <= TOL


def test_importing_a_vit_trained_on_other_pixel_statistics_says_so(caplog):
    """mmm's pipelines normalise with ImageNet's statistics; a ViT trained with mean/std 0.5 (timm's
    vit_tiny_patch16_224) was imported without a word."""
    with caplog.at_level("WARNING", logger="mmm.interop"):
        import_timm_vit(_timm_vit())
    assert "normalised with mean (0.5, 0.5, 0.5)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmm.interop"):
        import_timm_vit(to_timm_model(_mmm_encoder()))  # mmm's own export: ImageNet statistics, no warning
    assert "normalised with mean" not in caplog.text


def test_export_refuses_what_timm_cannot_represent():
    with pytest.raises(ValueError, match=r"encoder.norm_first=False, but timm's ViT block is pre-LayerNorm"):
        export_timm_vit(_mmm_encoder(dict(norm_first=False)))
    with pytest.raises(ValueError, match=r"encoder.mlp='swiglu'"):
        export_timm_vit(_mmm_encoder(dict(mlp="swiglu")))
    with pytest.raises(TypeError, match="expected an mmm ImageEncoder"):
        export_timm_vit(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw,message", [
    pytest.param(dict(reg_tokens=4), r"reg_tokens=4 \(mmm's image embedder has no register tokens\)", id="registers"),
    pytest.param(dict(qk_norm=True), r"qk_norm=True", id="qk-norm"),
    pytest.param(dict(act_layer="gelu_tanh"), r"MLP activation .*exact \(erf\) GELU", id="tanh-gelu"),
    pytest.param(dict(img_size=(32, 48)), r"img_size=\(32, 48\) is not square", id="non-square"),
])
def test_import_refuses_unsupported_variants(kw, message):
    with pytest.raises(ValueError, match="cannot import this timm ViT into mmm: " + message):
        import_timm_vit(_timm_vit(**kw))


def test_import_refuses_other_architectures():
    with pytest.raises(ValueError, match="only timm.models.vision_transformer.VisionTransformer"):
        import_timm_vit(timm.create_model("resnet18", pretrained=False, num_classes=0))


# ----------------------------------------------------------------------------- weight files


def test_load_from_safetensors_and_pth(tmp_path: Path):
    from safetensors.torch import save_file

    model = timm.create_model(NAME, pretrained=False, num_classes=10, **TINY).eval()
    _perturb(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "vit.safetensors"))
    torch.save(state, tmp_path / "vit.pth")
    for name in ("vit.safetensors", "vit.pth"):
        enc = load_timm_encoder(tmp_path / name, NAME, model_kwargs=TINY)  # head.* dropped
        assert _max_diff(model, enc) <= TOL


def test_weight_file_errors(tmp_path: Path):
    model = _timm_vit()
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="timm_model= to load_encoder, model_name= to import_timm_vit"):
        import_timm_vit(path)
    with pytest.raises(ValueError, match=r"weight 'pos_embed' has shape \(1, 17, 64\) .* expects \(1, 785, 64\)"):
        load_timm_encoder(path, NAME, model_kwargs=dict(embed_dim=64, depth=2, num_heads=4, patch_size=8))
    with pytest.raises(ValueError, match="timm cannot build 'vit_no_such_model'"):
        load_timm_encoder(path, "vit_no_such_model")
    (tmp_path / "vit.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown weights format '.ckpt'"):
        load_timm_encoder(tmp_path / "vit.ckpt", NAME)
    with pytest.raises(FileNotFoundError):
        load_timm_encoder(tmp_path / "missing.safetensors", NAME)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="extract the model's state_dict first"):
        load_timm_encoder(tmp_path / "wrapped.pth", NAME, model_kwargs=TINY)


def _touch(path: str) -> None:
    Path(path).write_text("pwned")


class _Payload:
    """Unpickling this would call ``_touch``: code execution from a weights file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def test_pickle_payload_is_refused_without_running(tmp_path: Path):
    sentinel = tmp_path / "sentinel.txt"
    path = tmp_path / "evil.pth"
    torch.save({"pos_embed": torch.zeros(1), "payload": _Payload(str(sentinel))}, path)
    with pytest.raises(ValueError, match="refusing to load .*weights_only=True"):
        load_timm_encoder(path, NAME, model_kwargs=TINY)
    assert not sentinel.exists()


def test_pt_file_without_timm_model_gets_the_timm_model_hint(tmp_path: Path):
    from mmm.encoders import load_encoder

    model = _timm_vit()
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match=r"vit.pt looks like a weights file: for a timm ViT pass timm_model="):
        load_encoder(path, modality="image")  # .pt is a timm weights file like .pth and .bin


def test_bad_timm_kwargs_are_a_value_error_naming_them(tmp_path: Path):
    from mmm.encoders import load_encoder

    model = _timm_vit()
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match=r"timm cannot build 'vit_tiny_patch16_224' with create_model arguments "
                                         r"\{'img_sz': 32\} \(timm_kwargs\): TypeError: .*'img_sz'"):
        load_encoder(path, modality="image", timm_model=NAME, timm_kwargs={"img_sz": 32})
    with pytest.raises(ValueError, match="timm_model= to load_encoder"):
        load_encoder(path, modality="image", timm_kwargs=TINY)
    enc = load_encoder(path, modality="image", timm_model=NAME, timm_kwargs=TINY, attention="math")
    assert enc.encoder.backend_for(torch.device("cpu")) == "math"
    assert _max_diff(model, enc) <= TOL
