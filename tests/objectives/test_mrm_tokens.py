"""Masked visual-token modeling in vision-language (objective ``mvm``, VIOLET / E-ViLM with a k-means
codebook): the image-text pipeline labels exactly the hidden patches with the image modality's codes,
the head scores only them, and a run fits the codebook once and shares it with the image modality."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, fit_head
import mmm.objectives  # noqa: F401  (registers the objectives)
from mmm.batch import ImageInput, PackedBatch, RegionTargets, TokenTargets
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo
from mmm.modalities.image.embedder import ImageEmbedder
from mmm.modalities.image.pipeline import visual_token_features
from mmm.modalities.image.transforms import denormalize
from mmm.registry import MASKERS, OBJECTIVES
from mmm.targets.kmeans import Codebook

from data.test_image_text_pipeline import IMAGE, assert_layout, run, settings, shards, tok  # noqa: F401  (fixtures)

D, K = 16, 8


def _codebook(patch: int = IMAGE.patch_size) -> Codebook:
    rng = np.random.default_rng(0)
    return Codebook.fit(rng.standard_normal((200, 3 * patch * patch)).astype(np.float32), K, seed=0)


def test_mrm_patch_batches_carry_visual_tokens_exactly_at_hidden_patches(shards, tok):  # noqa: F811
    cb = _codebook()
    masker = MASKERS.create("simmim_random", ratio=0.5, mask_patch=1)
    batches = run(shards, tok, settings("mrm", codebook=cb), masker)
    for batch in batches:
        assert_layout(batch)
        img: ImageInput = batch.inputs["image"]
        mrm, vt = batch.targets["mrm"], batch.targets["image_tokens"]
        assert torch.equal(vt.positions, mrm.positions)  # the hidden patches' stream slots, nothing else
        assert vt.count == int(img.mask.sum()) and set(vt.positions.tolist()) <= set(img.index.tolist())
        # each label is the code of the hidden patch's original (unmasked) pixels
        raw = denormalize(img.pixels, to_uint8=True)
        i, p = mrm.pixel_index.unbind(-1)
        expected = torch.from_numpy(cb.assign(visual_token_features(raw, IMAGE.patch_size)[i.numpy(), p.numpy()]))
        assert (expected == vt.labels).float().mean() > 0.95  # the uint8 round trip may flip rare ties
    labels = torch.cat([b.targets["image_tokens"].labels for b in batches])
    assert len(labels.unique()) > 1
    # the same masks as without a codebook: the targets ride along, the batch is otherwise unchanged
    plain = run(shards, tok, settings("mrm"), masker)
    assert all("image_tokens" not in b.targets for b in plain)
    assert all(torch.equal(a.targets["mrm"].positions, b.targets["mrm"].positions) for a, b in zip(batches, plain))


@pytest.mark.parametrize("mode", ["mlm", "itm", "itc"])
def test_other_modes_carry_no_visual_tokens(shards, tok, mode):  # noqa: F811
    masker = MASKERS.create("bert_random", vocab=tok.vocab(), ratio=0.3) if mode == "mlm" else None
    for batch in run(shards, tok, settings(mode, codebook=_codebook()), masker):
        assert "image_tokens" not in batch.targets


def test_a_codebook_of_another_patch_size_is_refused(shards, tok):  # noqa: F811
    masker = MASKERS.create("simmim_random", ratio=0.5, mask_patch=1)
    with pytest.raises(ValueError, match="refit it for model.image.patch_size"):
        run(shards, tok, settings("mrm", codebook=_codebook(patch=4)), masker)


def _embedders():
    return {"image": ImageEmbedder(dim=D, image_size=16, patch_size=4)}


def _mvm(**kw):
    torch.manual_seed(0)
    return OBJECTIVES.create("mvm", dim=D, embedders=_embedders(), encoder_cfg=EncoderConfig(dim=D, heads=2),
                             **{"num_classes": K, **kw})


def _batch(with_tokens: bool = True) -> PackedBatch:
    positions = torch.tensor([2, 5, 6, 11])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 1], mask[0, 4], mask[1, 0], mask[1, 5] = True, True, True, True
    targets = {"mrm": RegionTargets(positions, pixel_index=torch.tensor([[0, 1], [0, 4], [1, 0], [1, 5]]))}
    if with_tokens:
        targets["image_tokens"] = TokenTargets(positions, torch.tensor([3, 0, 7, 3]))
    return PackedBatch(PackedSeqInfo.from_seqlens([6, 6]),
                       {"image": ImageInput(torch.zeros(2, 3, 16, 16), mask, drop_masked=False)}, targets)


def test_mvm_is_cross_entropy_at_the_hidden_patches_only_and_learns():
    head, batch = _mvm(), _batch()
    hidden = torch.nn.Parameter(torch.randn(12, D, generator=torch.Generator().manual_seed(1)))
    t = batch.targets["image_tokens"]
    out = head(hidden, batch)
    logits = head.head.classifier(head.head.transform(hidden[t.positions]))
    assert torch.allclose(out.loss, F.cross_entropy(logits, t.labels), atol=1e-6)
    assert out.count == 4 and set(out.metrics) == {"acc"}
    out.loss.backward()
    rest = torch.ones(12, dtype=torch.bool)
    rest[t.positions] = False
    assert hidden.grad[t.positions].abs().sum() > 0 and hidden.grad[rest].abs().sum() == 0
    first = out.loss.item()
    out = fit_head(head, hidden, batch)
    assert out.loss.item() < 0.5 * first


def test_mvm_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="num_classes to model.image.visual_tokens"):
        OBJECTIVES.create("mvm", dim=D, embedders=_embedders(), encoder_cfg=EncoderConfig(dim=D, heads=2))
    with pytest.raises(ValueError, match="no patch image embedder named 'image'"):
        OBJECTIVES.create("mvm", dim=D, embedders={}, encoder_cfg=EncoderConfig(dim=D, heads=2), num_classes=K)
    with pytest.raises(ValueError, match="visual_tokens > 0"):  # hidden patches without a codebook
        _mvm()(torch.randn(12, D), _batch(with_tokens=False))
    with pytest.raises(ValueError, match="num_classes"):  # an id beyond the head's classes
        _mvm(num_classes=4)(torch.randn(12, D), _batch())
    # a batch of another task (nothing hidden, no targets) scores zero
    plain = PackedBatch(PackedSeqInfo.from_seqlens([6]), {"image": ImageInput(torch.zeros(1, 3, 16, 16))}, {})
    out = _mvm()(torch.randn(6, D), plain)
    assert out.count == 0 and float(out.loss.detach()) == 0.0


def _vtok_config(run_dir):
    from mmm.config import load_config

    data = yaml.safe_load((REPO / "configs" / "vl_uniter_vtok_tiny.yaml").read_text())
    data["model"]["encoder"].update(dim=32, depth=1, heads=2, mlp_hidden=64)
    data["model"]["text"].update(vocab_size=120, tokenizer_train_docs=300)
    data["model"]["image"].update(visual_tokens=K, codebook_images=40)
    data["objectives"][1]["args"]["num_classes"] = K
    data["data"].update(batch_size=8, shuffle_buffer=0)
    data["trainer"].update(max_steps=6, val_check_interval=1000, limit_val_batches=1, enable_progress_bar=False,
                           default_root_dir=str(run_dir))
    (run_dir.parent / "vl.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(run_dir.parent / "vl.yaml")


@pytest.fixture
def count_fits(monkeypatch):
    from mmm.modalities.image.modality import ImageModality

    fits = []
    original = ImageModality.fit_codebook

    def counting(self, urls, options=None):
        fits.append(list(urls))
        return original(self, urls, options)

    monkeypatch.setattr(ImageModality, "fit_codebook", counting)
    return fits


def test_one_codebook_per_run_shared_by_the_image_modality_and_every_mrm_stream(shards, tmp_path,  # noqa: F811
                                                                                 count_fits):
    from mmm.data.stream import list_shards
    from mmm.modalities.image.modality import CODEBOOK_FILE
    from mmm.train.tasks import build_modalities, prepare_modalities, task_configs

    cfg = _vtok_config(tmp_path / "run")
    urls = list_shards(shards, split="train")
    tasks = task_configs(cfg)
    mods = build_modalities(cfg, tasks, {t.name: urls for t in tasks})
    prepare_modalities(mods, tmp_path / "run")
    assert count_fits == [urls]  # fitted once, on the pairs' images (the image modality reads image_text shards)
    image = mods.base["image"]
    assert image.codebook.k == K and (tmp_path / "run" / "image" / CODEBOOK_FILE).is_file()
    for name in ("mlm", "mvm", "itm", "itc"):  # every image-text stream holds that one codebook, only mrm uses it
        mode = mods.feeds[name].check_options({"mode": name if name != "mvm" else "mrm"})
        assert mods.feeds[name].settings_for(mode).codebook is (image.codebook if mode == "mrm" else None)
    # a second preparation of the same run folder reuses the saved codebook instead of fitting again
    again = build_modalities(cfg, tasks, {t.name: urls for t in tasks})
    prepare_modalities(again, tmp_path / "run")
    assert len(count_fits) == 1 and np.array_equal(again.base["image"].codebook.centroids, image.codebook.centroids)


@pytest.mark.slow
def test_vtok_preset_trains_the_mvm_head(tmp_path, count_fits):
    from mmm.train.pretrain import pretrain

    run_ = pretrain(_vtok_config(tmp_path / "run"))
    assert len(count_fits) == 1
    assert run_.datamodule.source_counts()["mvm"]["batches"] > 0
    assert "mvm" in run_.module.model.objectives
