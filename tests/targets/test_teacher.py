"""Frozen teachers for MRM targets: safe local loading, input mapping, grid resampling, out of the state_dict."""
import os

import pytest
import torch
import torch.nn.functional as F

from mmm.batch import ImageInput, PackedBatch, RegionTargets
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo
from mmm.modalities.image.transforms import IMAGENET_MEAN, IMAGENET_STD
from mmm.modalities.image.embedder import ImageEmbedder
import mmm.objectives  # noqa: F401  (registers the objectives)
from mmm.registry import OBJECTIVES
from mmm.targets.teacher import build_teacher, read_weight_file

timm = pytest.importorskip("timm")
KW = {"img_size": 32, "patch_size": 4, "num_classes": 7}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A random tiny timm ViT with a 7-class head, saved as safetensors (no download)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KW).eval()
    path = tmp_path_factory.mktemp("teacher") / "vit.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def _spec(path, **kw):
    return {"kind": "timm", "model": "vit_tiny_patch16_224", "path": str(path), "kwargs": {**KW, **kw}}


def _mmm_pixels(b, size, seed=0):
    x01 = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return x01, (x01 - mean) / std


def test_same_grid_matches_timm_on_its_own_normalisation(vit):
    model, path = vit
    teacher = build_teacher(_spec(path), grid=(8, 8))
    assert teacher.feature_dim == 192 and teacher.num_classes == 7 and teacher.token_grid == (8, 8)
    x01, pixels = _mmm_pixels(2, 32)
    out = teacher(pixels)
    cfg = model.pretrained_cfg
    ref_in = (x01 - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        tokens = model.forward_features(ref_in)[:, model.num_prefix_tokens:]
        soft = model.head(model.fc_norm(tokens)).softmax(-1)
    assert out.features.shape == (2, 64, 192) and out.soft_labels.shape == (2, 64, 7)
    assert torch.allclose(out.features, tokens, atol=1e-4) and torch.allclose(out.soft_labels, soft, atol=1e-5)


def test_other_grid_is_resampled_onto_mmm_grid(vit):
    _, path = vit
    teacher = build_teacher(_spec(path), grid=(4, 4))  # mmm: 16x16 images, 4x4 patches
    _, pixels = _mmm_pixels(3, 16)
    out = teacher(pixels)
    assert out.features.shape == (3, 16, 192) and out.soft_labels.shape == (3, 16, 7)
    assert torch.allclose(out.soft_labels.sum(-1), torch.ones(3, 16), atol=1e-5)
    assert not out.features.requires_grad


def _teacher_objective(name, path, **spec_kw):
    torch.manual_seed(0)
    emb = ImageEmbedder(16, image_size=16, patch_size=4, cls_token=True)
    return OBJECTIVES.create(name, dim=16, embedders={"image": emb}, encoder_cfg=EncoderConfig(dim=16, heads=2),
                             teacher=_spec(path, **spec_kw))


def _pixel_batch():
    _, pixels = _mmm_pixels(2, 16)
    pixel_index = torch.tensor([[0, 0], [0, 5], [1, 15], [1, 3]])
    positions = torch.tensor([1, 6, 33, 21])  # CLS + patch in a 17-token sequence per image
    t = RegionTargets(positions, pixel_index=pixel_index)
    return PackedBatch(PackedSeqInfo.from_seqlens([17, 17]), {"image": ImageInput(pixels)}, {"mrm": t})


@pytest.mark.parametrize("name", ["mrfr", "mrc", "mrc_kl"])
def test_teacher_targets_frozen_and_outside_the_state_dict(vit, name):
    _, path = vit
    head = _teacher_objective(name, path)
    teacher = head.source.teacher
    assert all(k.startswith("head.") for k in head.state_dict())  # no teacher weights saved with the model
    assert not any(p is q for p in head.parameters() for q in teacher.model.parameters())
    head.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    hidden = torch.nn.Parameter(torch.randn(34, 16))
    batch = _pixel_batch()
    out = head(hidden, batch)
    assert torch.isfinite(out.loss) and out.count == 4
    out.loss.backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    # the targets are the teacher's at (image, patch)
    full = teacher(batch.inputs["image"].pixels)
    idx = batch.targets["mrm"].pixel_index
    if name == "mrfr":
        assert head.feature_dim == 192
        expected = F.mse_loss(head.head(hidden[batch.targets["mrm"].positions]), full.features[idx[:, 0], idx[:, 1]])
        assert torch.allclose(out.loss, expected, atol=1e-5)
    else:
        assert head.num_classes == 7
    opt = torch.optim.Adam([hidden, *head.parameters()], lr=1e-2)
    first = out.loss.item()
    for _ in range(20):
        opt.zero_grad()
        out = head(hidden, batch)
        out.loss.backward()
        opt.step()
    assert out.loss.item() < first


def test_classifier_objectives_need_a_classifier_teacher(tmp_path):
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=0)
    path = tmp_path / "headless.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.raises(ValueError, match="no classifier head"):
        _teacher_objective("mrc_kl", path, num_classes=0)
    mrfr = _teacher_objective("mrfr", path, num_classes=0)  # features only: fine
    assert mrfr.feature_dim == 192


def test_config_dim_must_agree_with_the_teacher(vit):
    _, path = vit
    emb = ImageEmbedder(16, image_size=16, patch_size=4)
    with pytest.raises(ValueError, match="feature_dim=10 but the teacher gives 192"):
        OBJECTIVES.create("mrfr", dim=16, embedders={"image": emb}, encoder_cfg=EncoderConfig(dim=16, heads=2),
                          feature_dim=10, teacher=_spec(path))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickle_is_refused_naming_the_file(tmp_path):
    marker = str(tmp_path / "pwned")
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, bad)
    with pytest.raises(ValueError, match="evil.pth"):
        build_teacher(_spec(bad), grid=(8, 8))
    assert not os.path.exists(marker)


def test_torch_file_and_bad_specs(vit, tmp_path):
    model, _ = vit
    good = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, good)
    assert set(read_weight_file(good)) == set(model.state_dict())
    assert build_teacher(_spec(good), grid=(8, 8)).num_classes == 7
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_teacher(_spec(tmp_path / "missing.safetensors"), grid=(8, 8))
    with pytest.raises(ValueError, match=r"wrapped.pth.*head"):
        build_teacher(_spec(good, num_classes=3), grid=(8, 8))
    with pytest.raises(ValueError, match="pretrained"):
        build_teacher(_spec(good, pretrained=True), grid=(8, 8))
    with pytest.raises(ValueError, match="teacher.kind='hf'"):
        build_teacher({**_spec(good), "kind": "hf"}, grid=(8, 8))
    with pytest.raises(ValueError, match="unknown keys"):
        build_teacher({**_spec(good), "layer": 3}, grid=(8, 8))


def test_open_clip_teacher_patch_tokens(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    kwargs = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, **kwargs)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    spec = {"kind": "open_clip", "model": "ViT-B-32", "path": str(path), "kwargs": kwargs}
    teacher = build_teacher(spec, grid=(4, 4))
    assert teacher.token_grid == (4, 4) and teacher.feature_dim == 32 and not teacher.has_classifier
    _, pixels = _mmm_pixels(2, 16)
    assert teacher(pixels).features.shape == (2, 16, 32) and teacher(pixels).soft_labels is None
    emb = ImageEmbedder(16, image_size=16, patch_size=4)
    with pytest.raises(ValueError, match="no classifier head"):
        OBJECTIVES.create("mrc", dim=16, embedders={"image": emb}, encoder_cfg=EncoderConfig(dim=16, heads=2),
                          teacher=spec)


def test_built_model_carries_no_teacher_weights(vit):
    from mmm.config import ModelConfig, ObjectiveConfig
    from mmm.model import build_model

    _, path = vit
    enc = EncoderConfig(dim=16, depth=1, heads=2, mlp_hidden=32, attention="math")
    emb = ImageEmbedder(16, image_size=16, patch_size=4, cls_token=True)
    model = build_model(ModelConfig(encoder=enc), [ObjectiveConfig("mrfr", 1.0, {"teacher": _spec(path)})],
                        {"image": emb})
    keys = [k for k in model.state_dict() if k.startswith("objectives.")]
    assert keys and all(k.startswith("objectives.mrfr.head.") for k in keys)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    _, pixels = _mmm_pixels(2, 16)
    image, patch = mask.nonzero(as_tuple=True)
    t = RegionTargets(image * 17 + 1 + patch, pixel_index=torch.stack([image, patch], -1))
    batch = PackedBatch(PackedSeqInfo.from_seqlens([17, 17]), {"image": ImageInput(pixels, mask)}, {"mrm": t})
    loss, out = model(batch)
    assert torch.isfinite(loss) and out["mrfr"].count == int(mask.sum())


@pytest.mark.parametrize("name", ["mrfr", "mrc_kl"])
def test_teacher_targets_read_nothing_back_and_match_the_device_side_path(vit, name):
    """The teacher's images and patch range are found on the host when the targets are built; the same loss
    as targets built without them (the unique/min/max path a device-built batch takes)."""
    import dataclasses

    from mmm.host_reads import HostReadDetector

    _, path = vit
    head = _teacher_objective(name, path)
    batch = _pixel_batch()
    t = batch.targets["mrm"]
    assert t.teacher_images.tolist() == [0, 1] and t.teacher_slot.tolist() == [0, 0, 1, 1] and t.patch_range == (0, 15)
    hidden = torch.randn(34, 16, requires_grad=True)
    with HostReadDetector() as d:
        fast = head(hidden, batch).loss
        fast.backward()
    assert d.found == []
    bare = dataclasses.replace(batch, targets={"mrm": RegionTargets(t.positions, pixel_index=t.pixel_index.clone())})
    bare.targets["mrm"].teacher_images = None  # as if built on a device
    torch.testing.assert_close(head(hidden, bare).loss, fast, rtol=0, atol=0)
    wrong = dataclasses.replace(batch, targets={"mrm": RegionTargets(t.positions,
                                                                     pixel_index=t.pixel_index + torch.tensor([0, 2]))})
    with pytest.raises(ValueError, match=r"names patches 2\.\.17, but the grid has 16 patches"):
        head(hidden, wrong)
