"""The objectives' arguments are checked before the assets' fit (:mod:`mmm.objectives.dry_build`): a head is built
once with stand-in embedders, so what it refuses without reading an embedder is refused in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import datasets_def  # noqa: F401  (registers the datasets)
from conftest import REPO, TINY_OVERRIDES
from mmm.config import ConfigError, EncoderConfig, ObjectiveConfig, load_config
from mmm.objectives.dry_build import check_objective_args
from mmm.train.pretrain import build_run
from mmm.train.tasks import build_modalities, task_configs

ENC = EncoderConfig(dim=32, depth=4, heads=2, mlp_hidden=64)


@pytest.mark.parametrize("objective, args, match", [
    ("d2v", {"top_k": 5}, r"objectives\[0\] \(objective 'd2v'\): top_k must be in \[1, encoder depth 4\], got 5"),
    ("d2v", {"loss": "l3"}, r"objective 'd2v'\): loss must be one of \('mse', 'smooth_l1'\), got 'l3'"),
    ("distill", {"teacher": "t.ckpt", "loss": "kl"}, r"objective 'distill'\): loss must be one of"),
    ("mlm", {"modality": "dna"}, r"objectives\[0\] \(objective 'mlm'\): .*'dna'"),
])
def test_a_heads_argument_is_refused_without_its_embedder(objective, args, match):
    with pytest.raises(ConfigError, match=match):
        check_objective_args([ObjectiveConfig(name=objective, args=args)], ENC, ["text"])


def test_the_dry_build_leaves_the_random_state_and_allocates_nothing():
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    check_objective_args([ObjectiveConfig(name="d2v", args={}), ObjectiveConfig(name="electra", args={})],
                         ENC, ["text"])
    assert torch.equal(torch.rand(3), want)  # the run's initialisation is the one it had without the check


def test_every_preset_passes_the_dry_build():
    """No stand-in or meta-device artefact is mistaken for a refusal."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path, {"trainer.default_root_dir": "unused"})
        modalities = build_modalities(cfg, task_configs(cfg)).base  # no shards needed for the names
        check_objective_args(cfg.objectives, cfg.model.encoder, modalities)


def test_pretrain_refuses_a_bad_head_argument_before_fitting_the_tokenizer(tmp_path: Path):
    """configs/text_d2v_tiny.yaml averages the top 3 blocks; at depth 2 it used to fail after the tokenizer's fit."""
    cfg = load_config(REPO / "configs" / "text_d2v_tiny.yaml",
                      {**TINY_OVERRIDES, "trainer.default_root_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"objective 'd2v'\): top_k must be in \[1, encoder depth 2\], got 3"):
        build_run(cfg)
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_prepare_refuses_what_the_run_would_refuse_but_not_the_machine_it_runs_on(tmp_path: Path):
    """mmm prepare fitted the assets of a config the run then refused; it checks the config first now, but not
    this machine (assets for a GPU run may be fitted on a CPU box)."""
    from mmm.train.tasks import prepare_run_assets

    bad = load_config(REPO / "configs" / "text_d2v_tiny.yaml",
                      {**TINY_OVERRIDES, "trainer.default_root_dir": str(tmp_path / "bad")})
    with pytest.raises(ConfigError, match=r"objective 'd2v'\): top_k must be in \[1, encoder depth 2\], got 3"):
        prepare_run_assets(bad)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match=r"heads"):
        prepare_run_assets(load_config(REPO / "configs" / "text_mlm_tiny.yaml", {
            **TINY_OVERRIDES, "model.encoder.heads": 3, "trainer.default_root_dir": str(tmp_path / "shape")}))
    gpu_run = load_config(REPO / "configs" / "text_mlm_tiny.yaml", {
        **TINY_OVERRIDES, "model.encoder.attention": "xformers", "trainer.default_root_dir": str(tmp_path / "gpu")})
    prepare_run_assets(gpu_run)  # on this CPU machine
    assert (tmp_path / "gpu" / "tokenizer").is_dir()


@pytest.mark.parametrize("objective, args, match", [
    ("d2v", {"top_k": "3"}, r"top_k must be int, got '3' \(a quoted YAML value is a string\)"),
    ("d2v", {"top_k": 2.5}, r"top_k must be int, got 2.5"),  # was cut to 2
    ("clm", {"meap": "false"}, r"meap must be bool, got 'false'"),  # was True
    ("mlm", {"tie_weights": "no"}, r"tie_weights must be bool, got 'no'"),  # was True
    ("electra", {"rtd_weight": None}, r"rtd_weight must be float, got None"),
    ("itc", {"embed_dim": 8.5}, r"embed_dim must be int or null, got 8.5"),
])
def test_an_argument_of_the_wrong_type_is_refused_before_the_fit(tmp_path, objective, args, match):
    """Objective args of the wrong type reached the head: a bare TypeError deep inside, or a silent coercion."""
    from mmm.train.settings_check import check_settings

    cfg = load_config(REPO / "configs" / "text_mlm_tiny.yaml", {"trainer.default_root_dir": str(tmp_path)})
    cfg.objectives = [ObjectiveConfig(name=objective, args=args)]
    with pytest.raises(ConfigError, match=match):
        check_settings(cfg)
    cfg.objectives = [ObjectiveConfig(name="mlm", args={"tie_weights": False})]  # the right types pass
    check_settings(cfg)
