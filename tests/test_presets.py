"""Every base preset trains at the batch and learning rate of the recipe it cites.

Two presets once trained at 8x their paper's batch (a per-device ``batch_size`` equal to the
paper's global batch, times 8 devices). The global batch is now what a preset states
(``data.global_batch_size``); this test pins each one to its source.
"""
from pathlib import Path

import pytest

from mmm.config import ConfigError, global_batch_size, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# preset: (global batch in sequences or None where the paper counts audio/tokens, peak lr, source)
RECIPES = {
    "text_mlm_bert_base.yaml": (256, 1e-4, "BERT (Devlin et al. 2019): 256 sequences, lr 1e-4"),
    "text_mlm_mosaicbert_base.yaml": (4096, 5e-4, "MosaicBERT-Base (Portes et al. 2023): 4096, lr 5e-4"),
    "dna_mlm_base.yaml": (4096, 5e-4, "DNABERT-2 (Zhou et al. 2024): 4096, lr 5e-4"),
    "image_mae_vit_base.yaml": (2048, 1.5e-4 * 2048 / 256, "MAE (He et al. 2022): lr = 1.5e-4 x batch / 256"),
    "text_mlm_bert_base_fsdp.yaml": (2048, 4e-4, "BERT-base at 8x BERT's batch (its own comment)"),
    "audio_mam_base.yaml": (None, 5e-4, "HuBERT Base (Hsu et al. 2021): lr 5e-4; batch counted in seconds"),
    "vl_uniter_base.yaml": (None, 5e-5, "UNITER-base (Chen et al. 2020): lr 5e-5; batch counted in tokens"),
}


def test_every_base_preset_is_pinned():
    assert {p.name for p in CONFIGS.glob("*_base*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_base_preset_matches_its_recipe(preset):
    want_batch, want_lr, source = RECIPES[preset]
    cfg = load_config(CONFIGS / preset)
    assert cfg.optim.lr == pytest.approx(want_lr, rel=1e-6), source
    if want_batch is not None:
        assert global_batch_size(cfg) == want_batch, source


def test_global_batch_is_split_over_devices_nodes_and_accumulation():
    cfg = load_config(CONFIGS / "text_mlm_mosaicbert_base.yaml")
    assert (cfg.data.batch_size, global_batch_size(cfg)) == (512, 4096)  # 8 devices
    cfg = load_config(CONFIGS / "text_mlm_mosaicbert_base.yaml",
                      {"trainer.num_nodes": 2, "trainer.accumulate_grad_batches": 2})
    assert (cfg.data.batch_size, global_batch_size(cfg)) == (128, 4096)


def test_global_batch_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"global_batch_size 4096 does not divide by .* = 8 \* 1 \* 3 = 24"):
        load_config(CONFIGS / "text_mlm_mosaicbert_base.yaml", {"trainer.accumulate_grad_batches": 3})
    with pytest.raises(ConfigError, match=r"data.batch_size 100 contradicts data.global_batch_size 4096"):
        load_config(CONFIGS / "text_mlm_mosaicbert_base.yaml", {"data.batch_size": 100})
    with pytest.raises(ConfigError, match=r"trainer.devices as a number"):
        load_config(CONFIGS / "text_mlm_mosaicbert_base.yaml", {"trainer.devices": "auto"})
    cfg = load_config(CONFIGS / "text_mlm_mosaicbert_base.yaml", {"data.batch_size": 512})  # consistent: fine
    assert cfg.data.batch_size == 512


def test_a_global_batch_override_derives_the_per_device_batch_over_the_files():
    """Flat precedence: --data.global_batch_size beats the file's data.batch_size (it was a contradiction error,
    so a preset's per-device batch could not give way to a global one on the command line)."""
    cfg = load_config(CONFIGS / "text_mlm_tiny.yaml", {"data.global_batch_size": 64, "trainer.accumulate_grad_batches": 2})
    assert (cfg.data.batch_size, global_batch_size(cfg)) == (32, 64)
    with pytest.raises(ConfigError, match=r"data.batch_size 32 contradicts data.global_batch_size 64"):  # same level
        load_config(CONFIGS / "text_mlm_tiny.yaml", {"data.global_batch_size": 64, "data.batch_size": 32})
    whole = load_config(CONFIGS / "text_mlm_tiny.yaml", {"data": {"global_batch_size": 64}})  # replaces the section
    assert (whole.data.batch_size, global_batch_size(whole)) == (64, 64)


def test_without_global_batch_the_per_device_batch_is_kept():
    cfg = load_config(CONFIGS / "text_mlm_tiny.yaml", {"data.batch_size": 7})
    assert cfg.data.batch_size == 7 and cfg.data.global_batch_size is None
