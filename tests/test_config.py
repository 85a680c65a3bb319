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


def test_scientific_notation_is_a_number_in_args_files_and_overrides(tmp_path):
    """PyYAML's YAML 1.1 rules read 4e-2 as a string: inside an ``args`` mapping nothing converted it back."""
    from mmm.config import parse_override_value

    assert [parse_override_value(t) for t in ("4e-2", "1e4", "-2E3", "1.5", "10", "abc")] == [0.04, 1e4, -2e3, 1.5, 10, "abc"]
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 5e-4\n  name: sophia\n  args: {rho: 4e-2}\nmasking:\n  name: bert_random\n  args: {ratio: 3e-1}\n")
    cfg = load_config(p, {"optim.args.rho": parse_override_value("4e-2")})
    assert cfg.optim.lr == 5e-4 and cfg.optim.args == {"rho": 0.04} and cfg.masking.args == {"ratio": 0.3}


def test_a_repeated_yaml_key_is_an_error_naming_both_lines(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  max_steps: 7\ndata:\n  batch_size: 4\ntrainer:\n  max_steps: 9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: key 'trainer' repeated \(first at line 1\)"):
        load_config(p)


def test_infinite_values_and_a_home_relative_run_folder(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"optim.lr must be a finite number, got inf"):
        load_config(None, {"optim.lr": float("inf")})
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, {"trainer.default_root_dir": "~/runs/x"})
    assert cfg.trainer.default_root_dir == str(tmp_path / "runs" / "x")


def test_a_config_with_tasks_refuses_the_single_task_data_and_masking_keys():
    from mmm.train.tasks import task_configs

    vl = Path(__file__).parents[1] / "configs" / "vl_uniter_tiny.yaml"
    for key, value, field in (("data.train", "shards/pairs", "train"), ("masking.name", "whole_word", "masking")):
        with pytest.raises(ValueError, match=rf"a config with tasks .* tasks.0.{field} \(mlm\), tasks.1.{field}"):
            task_configs(load_config(vl, {key: value}))
    assert all(t.val is None for t in task_configs(load_config(vl, {"data.val": None})))


@pytest.mark.parametrize("key, value, allowed", [
    ("model.encoder.mlp", "relu", "gelu, glu, geglu, swiglu"),
    ("model.encoder.relative_position", "t5", "none, alibi, rotary"),
    ("model.encoder.attention", "flash", "auto, flex, math, sdpa, xformers"),
    ("model.text.tokenizer", "unigram", "wordpiece, bpe"),
    ("model.dna.position", "rope", "learned, sinusoidal, none"),
    ("model.image.position", "2d", "learned, sincos, none"),
    ("model.audio.token", "frame", "time, patch"),
    ("model.image_text.layout", "dual", "single, two_stream"),
    ("optim.name", "adam", "adamw, lamb, sophia"),
    ("optim.schedule", "step", "linear, cosine, constant"),
    ("trainer.nonfinite_loss", "ignore", "stop, skip"),
    ("trainer.precision", "fp16", "32-true"),
])
def test_a_string_outside_its_fields_choices_is_refused_when_read_naming_key_and_choices(key, value, allowed, tmp_path):
    """Before, most of these were refused only after the tokenizer's fit, in words that named no key."""
    with pytest.raises(ConfigError, match=rf"override --{key}: {key} must be one of .*{allowed}.*; got '{value}'"):
        load_config(None, {key: value})
    p = tmp_path / "c.yaml"
    section, _, name = key.rpartition(".")
    node = data = {}
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = value
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"c.yaml: {key} must be one of"):
        load_config(p)


def test_objective_names_are_checked_when_read_and_list_entry_overrides_are_named_as_overrides():
    vl = Path(__file__).resolve().parents[1] / "configs" / "vl_uniter_tiny.yaml"
    with pytest.raises(ConfigError, match=r"^override --objectives.0.name: objectives\[0\].name must be one of "
                                          r"clm, .*mlm.*; got 'mlmm'"):
        load_config(CONFIGS[0], {"objectives.0.name": "mlmm"})
    with pytest.raises(ConfigError, match=r"^override --tasks.1.weight: tasks\[1\].weight must be > 0, got 0"):
        load_config(vl, {"tasks.1.weight": 0})


def test_an_empty_config_file_is_refused(tmp_path):
    """An empty file trained the defaults (a text run of 1,000 steps) without a word."""
    for text in ("", "# only a comment\n"):
        p = tmp_path / "empty.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=r"empty.yaml: the file holds no settings"):
            load_config(p)


def test_an_override_value_with_a_hash_is_kept_whole():
    """YAML reads `` #`` as the start of a comment: ``runs/a #2`` became ``runs/a``."""
    ov = parse_overrides(["--trainer.default_root_dir", "runs/a #2", "--data.train", "#shards"])
    cfg = load_config(None, ov)
    assert cfg.trainer.default_root_dir == "runs/a #2" and cfg.data.train == "#shards"


def test_image_max_pixels_cannot_promise_more_than_pil_decodes():
    """PIL refuses headers over 2 x Image.MAX_IMAGE_PIXELS itself: a larger max_pixels was not honoured."""
    from PIL import Image

    assert 2 * Image.MAX_IMAGE_PIXELS == 178_956_970
    with pytest.raises(ConfigError, match=r"model.image.max_pixels must be >= 1 and <= 178956970, got 300000000"):
        load_config(None, {"model.image.max_pixels": 300_000_000})
