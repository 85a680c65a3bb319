"""Image pretraining runs: SimMIM + BEiT-style visual tokens with a fitted codebook, assets in checkpoints."""
import torch

from mmm.encoders import read_checkpoint
from mmm.train.pretrain import build_model_for, build_run, modality_from_checkpoint, pretrain

from conftest import REPO, TINY_IMAGE_OVERRIDES


def _simmim_config(run_dir, **extra):
    from mmm.config import load_config

    classes = extra.get("model.image.visual_tokens", 16)  # the head's classes are the codebook's entries
    return load_config(REPO / "configs" / "image_simmim_tiny.yaml", {
        **TINY_IMAGE_OVERRIDES, "trainer.default_root_dir": str(run_dir), "model.image.visual_tokens": 16,
        "model.image.codebook_images": 64, "objectives": [
            {"name": "simmim"}, {"name": "token_targets", "label": "visual_tokens",
                                 "args": {"target": "image_tokens", "num_classes": classes}}],
        "masking.args": {"ratio": 0.4, "min_patches": 2}, **extra})


def test_visual_token_targets_sit_on_hidden_patches(tmp_path):
    run = build_run(_simmim_config(tmp_path / "run", **{"data.val": None}))
    batch = next(iter(run.datamodule.train_dataloader()))
    run.datamodule.teardown("fit")
    img, tok = batch.inputs["image"], batch.targets["image_tokens"]
    assert not img.drop_masked and img.mask.any()
    assert tok.count == int(img.mask.sum()) and int(tok.labels.max()) < 16
    # positions are the stream slots of hidden patches: image start + [CLS] + patch index
    t = 1 + 16
    where = img.mask.nonzero()
    assert torch.equal(tok.positions, where[:, 0] * t + 1 + where[:, 1])
    # and the labels are the codebook's ids of those patches
    from mmm.modalities.image.pipeline import visual_token_features
    from mmm.modalities.image.transforms import denormalize

    raw = denormalize(img.pixels, to_uint8=True)
    feats = visual_token_features(raw, 4)[img.mask.numpy()]
    ids = run.modality.codebook.assign(feats)
    assert (torch.from_numpy(ids) == tok.labels).float().mean() > 0.95  # uint8 round trip may flip rare ties


def test_simmim_run_learns_and_its_codebook_travels_in_the_checkpoint(tmp_path):
    run = pretrain(_simmim_config(tmp_path / "run", **{"trainer.max_steps": 25, "data.val": None,
                                                     "optim.warmup_steps": 5, "optim.lr": 3e-3, "trainer.log_every_n_steps": 1}))
    contents = read_checkpoint(run.last_checkpoint)
    assert "visual_codebook.json" in contents.assets["image"]
    modality = modality_from_checkpoint(contents)
    assert modality.codebook is not None and modality.codebook.k == 16
    import numpy as np

    np.testing.assert_array_equal(modality.codebook.centroids, run.modality.codebook.centroids)
    model = build_model_for(contents.config, modality)
    model.load_state_dict(contents.state_dict)
    import csv

    rows = [r for r in csv.DictReader(open(run.csv_logger.log_dir + "/metrics.csv")) if r.get("train/visual_tokens_loss")]
    losses = [float(r["train/visual_tokens_loss"]) for r in rows]
    assert np.mean(losses[-5:]) < losses[0] - 0.15, losses


def test_visual_token_targets_in_mae_mode_are_refused_not_silently_untrained(tmp_path):
    """MAE mode keeps hidden patches out of the encoder, so image batches carry no visual-token targets: a
    token_targets head on image_tokens there would never train, so building the model refuses it by name."""
    import pytest

    cfg = _simmim_config(tmp_path / "run", **{"model.image.drop_masked": True})
    with pytest.raises(ValueError, match=r"'visual_tokens' \(token_targets on image_tokens\) needs mask-token mode"):
        build_run(cfg)
    assert not any(p.is_file() for p in (tmp_path / "run").rglob("*"))  # refused before the codebook's fit


def test_a_run_folders_codebook_that_no_longer_fits_the_config_is_refused(tmp_path):
    """A rerun with visual_tokens 32 kept the folder's 16-entry codebook (half the head never a target); with
    another patch size, patch features were cut into the old width before a reshape crash."""
    import pytest

    from mmm.train.tasks import prepare_run_assets

    run_dir = tmp_path / "run"
    prepare_run_assets(_simmim_config(run_dir, **{"data.val": None}))
    with pytest.raises(ValueError, match=r"visual_codebook.json does not fit the config: it has 16 entries but "
                                         r"model.image.visual_tokens is 32; .*delete .* to fit a new one"):
        prepare_run_assets(_simmim_config(run_dir, **{"data.val": None, "model.image.visual_tokens": 32}))
    with pytest.raises(ValueError, match=r"its features have 48 values but a 8-pixel patch has 192"):
        prepare_run_assets(_simmim_config(run_dir, **{"data.val": None, "model.image.patch_size": 8}))


def test_the_codebook_fit_skips_and_counts_bad_images_only_with_skip_bad(tmp_path, caplog):
    """The fit read images with no bad-sample policy: one bad image stopped a run configured to skip it."""
    import io
    import tarfile

    import pytest

    from mmm.train.tasks import prepare_run_assets
    from mmm.train.tasks import resolve_shards

    good = resolve_shards("embedded", "image", "train")[0]
    bad = tmp_path / "shards" / "train-000000.tar"
    bad.parent.mkdir()
    with tarfile.open(good) as tin, tarfile.open(bad, "w") as tout:
        for i, m in enumerate(tin.getmembers()):
            data = tin.extractfile(m).read()
            if i == 0:  # the first image: not an image any more
                data = b"not an image"
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    cfg = _simmim_config(tmp_path / "strict", **{"data.val": None, "data.train": str(bad.parent)})
    with pytest.raises(ValueError, match=r"fitting the visual-token codebook: .*set data.skip_bad: true"):
        prepare_run_assets(cfg)
    with caplog.at_level("WARNING"):
        prepare_run_assets(_simmim_config(tmp_path / "lenient", **{"data.val": None, "data.train": str(bad.parent),
                                                                   "data.skip_bad": True}))
    assert "visual-token codebook: 1 bad image(s) skipped while fitting" in caplog.text
