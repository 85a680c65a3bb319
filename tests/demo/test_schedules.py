"""``mmm demo --full``: the longer schedules are overrides of the part presets, listed in one place."""
from __future__ import annotations

import importlib

import pytest

from mmm.config import ConfigError, load_config
from mmm.demo import FULL_SCHEDULES, PARTS, check_demo_args
from mmm.demo.common import part_config


@pytest.mark.parametrize("part", sorted(PARTS))
def test_every_part_has_a_longer_schedule_that_applies_to_its_preset(part, tmp_path) -> None:
    module = importlib.import_module(PARTS[part].split(":")[0])
    preset = load_config(module.DEFAULT_CONFIG)
    full = part_config(None, module.DEFAULT_CONFIG, tmp_path, None, False, FULL_SCHEDULES[part])
    assert full.trainer.max_steps > preset.trainer.max_steps  # longer than the default demo
    assert full.trainer.default_root_dir == str(tmp_path / "run")
    # --max_steps still wins over the schedule
    assert part_config(None, module.DEFAULT_CONFIG, tmp_path, 7, False, FULL_SCHEDULES[part]).trainer.max_steps == 7


def test_full_is_refused_with_a_replacement_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--full"):
        check_demo_args(["text"], None, tmp_path / "my.yaml", full=True)
    check_demo_args(["text"], None, None, full=True)


@pytest.mark.parametrize("part", sorted(PARTS))
def test_each_parts_own_preset_passes_as_its_config(part) -> None:
    module = importlib.import_module(PARTS[part].split(":")[0])
    check_demo_args([part], None, module.DEFAULT_CONFIG)


def test_a_config_the_part_cannot_score_is_refused_before_training(tmp_path) -> None:
    """``mmm demo --parts image --config configs/text_mlm_tiny.yaml`` trained the text model, then crashed."""
    configs = importlib.import_module("mmm.demo.text").DEFAULT_CONFIG.parent
    with pytest.raises(ConfigError, match=r"the image part trains and scores the image modality, but this config "
                                          r"trains text"):
        check_demo_args(["image"], None, configs / "text_mlm_tiny.yaml")
    with pytest.raises(ConfigError, match=r"the text part scores the 'mlm' head, which this config lacks"):
        check_demo_args(["text"], None, configs / "text_electra_tiny.yaml")
    no_itc = tmp_path / "vl.yaml"
    text = (configs / "vl_uniter_tiny.yaml").read_text()
    assert "mode: itc" in text
    no_itc.write_text(text.replace("mode: itc", "mode: itm"))
    with pytest.raises(ConfigError, match=r"the vl part ranks images and captions .* mode itc"):
        check_demo_args(["vl"], None, no_itc)
    itc_without_contrast = tmp_path / "vl_no_itc_head.yaml"
    itc_without_contrast.write_text(text.replace("    objectives: [itc]\n    options: {mode: itc}",
                                                 "    objectives: [itm]\n    options: {mode: itc}")
                                    .replace("    objectives: [itm]\n    options: {mode: itm}",
                                             "    objectives: [itm, itc]\n    options: {mode: itm}"))
    assert itc_without_contrast.read_text() != text
    with pytest.raises(ConfigError, match=r"a contrastive head \(itc\) of the itc task 'itc', whose objectives "
                                          r"\['itm'\] have none"):
        check_demo_args(["vl"], None, itc_without_contrast)
