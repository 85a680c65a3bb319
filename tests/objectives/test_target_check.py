"""A codebook head (``token_targets``, ``mvm``) is checked against the targets the run's modalities produce, before
any data is read (:mod:`mmm.objectives.target_check`): a typo in ``target`` used to train nothing, silently."""
from __future__ import annotations

from pathlib import Path

import pytest

import datasets_def  # noqa: F401  (registers the datasets)
from conftest import REPO
from mmm.config import ConfigError, load_config
from mmm.objectives.target_check import check_token_targets
from mmm.train.pretrain import build_run
from mmm.train.tasks import build_modalities, task_configs


def _mods(cfg):
    return build_modalities(cfg, task_configs(cfg)).base.values()  # no shards needed for the targets


def test_every_preset_names_targets_its_modalities_produce_and_reads_every_target(caplog):
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path, {"trainer.default_root_dir": "unused"})
        with caplog.at_level("WARNING", logger="mmm.train"):
            check_token_targets(cfg.objectives, _mods(cfg))
        assert "no head reads them" not in caplog.text, path.name
        caplog.clear()


def test_a_target_no_head_reads_is_named_in_a_warning(caplog):
    """``model.audio.targets: [mfcc, chroma]`` with one head fitted a chroma codebook and computed its ids for every
    clip, and nothing said so."""
    cfg = load_config(REPO / "configs" / "audio_mam_tiny.yaml", {"trainer.default_root_dir": "unused",
                                                                 "model.audio.targets": ["mfcc", "chroma"]})
    with caplog.at_level("WARNING", logger="mmm.train"):
        check_token_targets(cfg.objectives, _mods(cfg))
    assert "codebook target(s) ['audio_chroma'] are fitted and computed for every sample, but no head reads" \
        in caplog.text


@pytest.mark.parametrize("overrides, match", [
    ({"objectives.0.args.target": "audio_mfc"},
     r"objectives\[0\] \(objective 'hubert_mfcc'\): target 'audio_mfc' is not produced by any modality of this "
     r"run \(its codebook targets: audio_mfcc \(64 classes\)\)"),
    ({"objectives.0.args.target": "audio_chroma"}, r"target 'audio_chroma' is not produced"),
    ({"model.audio.target_clusters": 16},
     r"objective 'hubert_mfcc'\): num_classes=64 but target 'audio_mfcc' has 16 classes .* set num_classes: 16"),
])
def test_a_head_on_a_target_the_run_does_not_produce_is_refused_before_the_fit(tmp_path: Path, overrides, match):
    cfg = load_config(REPO / "configs" / "audio_mam_tiny.yaml", {"trainer.default_root_dir": str(tmp_path / "run"),
                                                                  **overrides})
    with pytest.raises(ConfigError, match=match):
        build_run(cfg)
    assert not (tmp_path / "run" / "audio").exists()  # refused before the statistics and codebooks were fitted


def test_an_image_head_needs_the_visual_token_codebook():
    cfg = load_config(REPO / "configs" / "image_simmim_tiny.yaml", {"trainer.default_root_dir": "unused",
                                                                  "model.image.visual_tokens": 0})
    with pytest.raises(ConfigError, match=r"target 'image_tokens' is not produced .*codebook targets: none"):
        check_token_targets(cfg.objectives, _mods(cfg))
