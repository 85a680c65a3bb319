"""image_text composite modality, region embedder/modality and region masker; a MaskedModel forward over pairs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import mmm.masking  # noqa: F401
import mmm.modalities  # noqa: F401
from datasets_def import image as image_def
from datasets_def import image_text as it
from mmm.config import ComponentConfig, ModelConfig, ObjectiveConfig
from mmm.data.stream import SampleErrorHandler, list_shards, make_pipeline
from mmm.model import build_model
from mmm.registry import EMBEDDERS, MASKERS, MODALITIES, TOKENIZERS

F = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vl")
    (root / "img").mkdir()
    (root / "regions").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        shape, color = image_def.SHAPES[i], list(image_def.COLORS)[i]
        img, _ = image_def.render_scene(shape, color, "small", "left", np.random.default_rng(i))
        img.save(root / "img" / f"{i}.png")
        rows += [(f"{i}.png", f"a small {color} {shape} on the left"), (f"{i}.png", f"{shape} {color}")]
        np.savez(root / "regions" / f"{i}.npz", features=rng.standard_normal((3, F)).astype(np.float16),
                 boxes=np.array([[0, 0, 16, 16], [8, 8, 32, 32], [0, 0, 32, 32]]))
    with (root / "caps.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "caption"), *rows])
    it.build_shards(root / "img", root / "shards", captions=root / "caps.csv", regions=root / "regions")
    return root / "shards"


def model_cfg(image_input: str = "patches") -> ModelConfig:
    cfg = ModelConfig()
    cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.heads, cfg.encoder.mlp_hidden = 32, 1, 2, 64
    cfg.encoder.attention = "math"
    cfg.image.patch_size = 8
    cfg.text.max_len = 48
    cfg.regions.feature_dim = F
    cfg.image_text.image_input = image_input
    return cfg


def bound(shards: Path, image_input: str = "patches"):
    from datasets_def.text import iter_texts

    cfg = model_cfg(image_input)
    vl = MODALITIES.create("image_text", model_cfg=cfg)
    parts = {n: MODALITIES.create(n, model_cfg=cfg) for n in vl.uses()}
    parts["text"].tokenizer = TOKENIZERS.create("wordpiece", texts=list(iter_texts(shards)), vocab_size=100,
                                                lowercase=True)
    vl.bind(parts)
    return cfg, vl, parts


def batches(vl, shards, masker, mode, seed=0):
    stages = vl.stages(masker, batch_size=4, seed=seed, handler=SampleErrorHandler(), fixed_masking=False,
                       epochs=None, train=True, options={"mode": mode})
    return list(make_pipeline(list_shards(shards, split="train"), stages=stages, shuffle_shards=False,
                              shuffle_buffer=0))


def test_uses_and_bind(shards):
    assert MODALITIES.create("image_text", model_cfg=model_cfg()).uses() == ("text", "image")
    assert MODALITIES.create("image_text", model_cfg=model_cfg("regions")).uses() == ("text", "regions")
    vl = MODALITIES.create("image_text", model_cfg=model_cfg())
    with pytest.raises(ValueError, match="missing \\['image'\\]"):
        vl.bind({"text": MODALITIES.create("text", model_cfg=model_cfg())})
    with pytest.raises(ValueError, match="composite"):
        vl.build_embedder(model_cfg().encoder)
    with pytest.raises(ValueError, match="image_input"):
        cfg = model_cfg()
        cfg.image_text.image_input = "pixels"
        MODALITIES.create("image_text", model_cfg=cfg)
    _, vl, _ = bound(shards)
    assert vl.settings()["image_input"] == "patches" and vl.settings()["image.patch_size"] == 8


def test_build_masker_dispatches_by_name(shards):
    _, vl, _ = bound(shards)
    assert type(vl.build_masker(ComponentConfig("whole_word", {"ratio": 0.2}))).__name__ == "WholeWordMasker"
    assert type(vl.build_masker(ComponentConfig("mae_random", {}))).__name__ == "MaeRandomMasker"
    with pytest.raises(ValueError, match="does not fit model.image_text.image_input: patches"):
        vl.build_masker(ComponentConfig("region_random", {}))
    with pytest.raises(ValueError, match="not an image-text masker"):
        vl.build_masker(ComponentConfig("dna_span", {}))
    _, vlr, _ = bound(shards, "regions")
    assert type(vlr.build_masker(ComponentConfig("region_random", {}))).__name__ == "RegionRandomMasker"
    with pytest.raises(ValueError, match="does not fit"):
        vlr.build_masker(ComponentConfig("beit_block", {}))


def test_stages_check_options_and_masker_fit(shards):
    _, vl, _ = bound(shards)
    tok_masker = vl.build_masker(ComponentConfig("bert_random", {}))
    patch_masker = vl.build_masker(ComponentConfig("simmim_random", {"mask_patch": 1}))
    kw = dict(batch_size=2, seed=0, handler=SampleErrorHandler(), fixed_masking=False, epochs=None, train=True)
    with pytest.raises(ValueError, match="needs the task option 'mode'"):
        vl.stages(tok_masker, **kw)
    with pytest.raises(ValueError, match="unknown task option\\(s\\) \\['ratio'\\]"):
        vl.stages(tok_masker, **kw, options={"mode": "mlm", "ratio": 0.1})
    with pytest.raises(ValueError, match="one of \\['mlm', 'mrm', 'itm', 'itc'\\], got 'mim'"):
        vl.stages(tok_masker, **kw, options={"mode": "mim"})
    with pytest.raises(ValueError, match="mode mrm masks the image .* patch masker"):
        vl.stages(tok_masker, **kw, options={"mode": "mrm"})
    with pytest.raises(ValueError, match="mode mlm masks the caption"):
        vl.stages(patch_masker, **kw, options={"mode": "mlm"})
    assert vl.stages(tok_masker, **kw, options={"mode": "itm"})  # itm / itc ignore the masker


def test_max_text_len_must_fit_the_text_positions():
    cfg = model_cfg()
    cfg.image_text.max_text_len = 64
    with pytest.raises(ValueError, match="exceeds model.text.max_len=48"):
        MODALITIES.create("image_text", model_cfg=cfg)


def test_region_masker_ratio_at_least_one_and_one_visible():
    m = MASKERS.create("region_random")
    rng = np.random.default_rng(0)
    assert m(1, rng).tolist() == [True]
    assert m(2, rng).sum() == 1 and m(10, rng).sum() == 2 and m(100, rng).sum() == 15
    assert np.array_equal(m(36, np.random.default_rng(5)), m(36, np.random.default_rng(5)))
    with pytest.raises(ValueError, match="ratio"):
        MASKERS.create("region_random", ratio=1.5)


def test_region_embedder_zeroes_hidden_features_and_learned_positions():
    emb = EMBEDDERS.create("regions", dim=16, feature_dim=8, box_dim=7, dropout=0.0).eval()
    feats, boxes = torch.randn(5, 8), torch.rand(5, 7)
    mask = torch.tensor([False, True, False, False, True])
    out = emb(feats, boxes, mask)  # (5, 16)
    zeroed = feats.clone()
    zeroed[mask] = 0
    assert torch.allclose(out, emb(zeroed, boxes))
    other = feats.clone()
    other[mask] = 100.0
    assert torch.allclose(out, emb(other, boxes, mask))  # hidden features cannot leak
    assert not torch.allclose(emb(feats, boxes)[1], out[1])
    learned = EMBEDDERS.create("regions", dim=16, feature_dim=8, position="learned", max_regions=4)
    with pytest.raises(ValueError, match="position_ids"):
        learned(feats, boxes)
    assert learned(feats, boxes, None, torch.tensor([0, 1, 2, 0, 1])).shape == (5, 16)
    with pytest.raises(ValueError, match="feature_dim=8"):
        emb(torch.randn(5, 9), boxes)


def test_region_modality_has_no_stream_of_its_own():
    reg = MODALITIES.create("regions", model_cfg=model_cfg("regions"))
    assert reg.build_embedder(model_cfg().encoder).feature_dim == F
    with pytest.raises(ValueError, match="through image_text tasks"):
        reg.stages(None, batch_size=2, seed=0, handler=SampleErrorHandler(), fixed_masking=False, epochs=None,
                   train=True)
    with pytest.raises(ValueError, match="does not mask image regions"):
        reg.build_masker(ComponentConfig("bert_random", {}))


@pytest.mark.parametrize("image_input", ["patches", "regions"])
def test_masked_model_forward_over_image_text_batches(shards, image_input):
    cfg, vl, parts = bound(shards, image_input)
    embedders = {n: parts[n].build_embedder(cfg.encoder) for n in vl.uses()}
    model = build_model(cfg, [ObjectiveConfig("mlm")], embedders)
    masker = vl.build_masker(ComponentConfig("bert_random", {"ratio": 0.3}))
    for batch in batches(vl, shards, masker, "mlm"):
        loss, outputs = model(batch)
        assert torch.isfinite(loss) and outputs["mlm"].count == batch.targets["text"].count > 0
    loss.backward()
    vision = embedders[vl.uses()[1]]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.parameters())  # the image feeds the text
    # the other modes' batches embed and encode with the same embedders
    for mode, name in (("mrm", "region_random" if image_input == "regions" else "mae_random"), ("itm", None),
                       ("itc", None)):
        m = vl.build_masker(ComponentConfig(name, {})) if name else masker
        batch = batches(vl, shards, m, mode)[0]
        hidden = model.encode(batch)
        assert hidden.shape == (batch.num_tokens, cfg.encoder.dim) and torch.isfinite(hidden).all()


def test_same_seed_same_stream(shards):
    _, vl, _ = bound(shards)
    masker = vl.build_masker(ComponentConfig("mae_random", {}))
    a, b = batches(vl, shards, masker, "mrm", seed=1), batches(vl, shards, masker, "mrm", seed=1)
    assert all(torch.equal(x.inputs["image"].mask, y.inputs["image"].mask) for x, y in zip(a, b))
    c = batches(vl, shards, masker, "mrm", seed=2)
    assert not all(torch.equal(x.inputs["image"].mask, y.inputs["image"].mask) for x, y in zip(a, c))


def test_learned_region_positions_reach_the_embedder_through_the_batch():
    import torch

    from mmm.batch import RegionInput
    from mmm.modalities.image_text.regions import RegionEmbedder

    emb = RegionEmbedder(dim=16, feature_dim=8, max_regions=4, position="learned", dropout=0.0).eval()
    with torch.no_grad():  # the model builder initialises position tables normal(0.02); here make them large
        emb.positions.weight.normal_()
    feats, boxes = torch.randn(3, 8), torch.rand(3, 7)
    a = RegionInput(feats, boxes, torch.tensor([0, 1, 2])).embed(emb)
    b = RegionInput(feats, boxes, torch.tensor([2, 1, 0])).embed(emb)
    assert a.shape == (3, 16) and not torch.allclose(a, b)  # the positions are used
