from pathlib import Path

import pytest
import yaml

from mmm.cli import parse_overrides
from mmm.config import ConfigError, PretrainConfig, dump_config, from_dict, load_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses_and_builds(path):
    """Every YAML in configs/ parses strictly, and its registry parts accept their args."""
    import mmm.masking  # noqa: F401
    import mmm.modalities  # noqa: F401
    from mmm.model import build_model
    from mmm.registry import EMBEDDERS, MASKERS, OBJECTIVES, check_kwargs

    from mmm.train.tasks import build_modalities, task_configs

    cfg = load_config(path)
    tasks = task_configs(cfg)  # checks task names, weights and the heads each task names
    for t in tasks:
        check_kwargs(MASKERS.get(t.masking.name), t.masking.args, f"masker {t.masking.name!r}")
    for o in cfg.objectives:
        check_kwargs(OBJECTIVES.get(o.name), o.args, f"objective {o.name!r}")
    embedders = {}
    for name, modality in build_modalities(cfg, tasks).base.items():
        if name in ("text", "dna"):  # token modalities: their vocabulary comes from a tokenizer fitted on data
            section = getattr(cfg.model, name)
            embedders[name] = EMBEDDERS.create("text", vocab_size=300, dim=cfg.model.encoder.dim,
                                               max_len=section.max_len, position=section.position)
        else:
            embedders[name] = modality.build_embedder(cfg.model.encoder)
    model = build_model(cfg.model, cfg.objectives, embedders, {t.name: t.objectives for t in cfg.tasks} or None)
    assert sum(p.numel() for p in model.parameters()) > 0
    # the printed config is valid YAML that loads back to the same config
    again = from_dict(PretrainConfig, yaml.safe_load(dump_config(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_configs_present():
    names = {p.name for p in CONFIGS}
    assert {"text_mlm_tiny.yaml", "text_mlm_bert_base.yaml", "vl_uniter_tiny.yaml", "vl_uniter_base.yaml",
            "multimodal_tiny.yaml"} <= names


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  encoder:\n    dimm: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.encoder.dimm'; valid keys here: \[.*'dim'"):
        load_config(p)


def test_wrong_type_is_reported(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"trainer.max_steps: expected an integer, got 'lots'"):
        load_config(p)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(p)


def test_overrides_precedence_and_parsing():
    ov = parse_overrides(["--trainer.max_steps", "50", "--optim.lr=1e-3", "--data.val", "null",
                          "--masking.args", "{ratio: 0.3}"])
    cfg = load_config(None, ov)
    assert cfg.trainer.max_steps == 50 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.val is None and cfg.masking.args == {"ratio": 0.3}
    with pytest.raises(ConfigError, match="unknown override --trainer.max_stepz"):
        load_config(None, {"trainer.max_stepz": 1})
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--trainer.max_steps"])


def test_defaults_round_trip():
    cfg = PretrainConfig()
    assert to_dict(from_dict(PretrainConfig, to_dict(cfg))) == to_dict(cfg)


def test_overrides_reach_list_entries_by_index():
    vl = Path(__file__).resolve().parents[1] / "configs" / "vl_uniter_tiny.yaml"
    cfg = load_config(vl, {"tasks.1.train": "/data/shards", "tasks.0.weight": 3.0})
    assert cfg.tasks[1].train == "/data/shards" and cfg.tasks[0].weight == 3.0 and cfg.tasks[2].train == "embedded"
    with pytest.raises(ConfigError, match="has 5 entries"):
        load_config(vl, {"tasks.7.train": "x"})
    with pytest.raises(ConfigError, match="tasks.0.wieght"):
        load_config(vl, {"tasks.0.wieght": 1.0})
    with pytest.raises(ConfigError, match="no 'tasks' list"):
        load_config(CONFIGS[0], {"tasks.0.train": "x"})
