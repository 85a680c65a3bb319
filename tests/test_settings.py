"""Issue 13 §2: every setting is honoured or refused, never silently ignored."""
import json
import re
import logging
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_OVERRIDES, error_line, tiny_argv, tiny_config
from mmm.cli import main
from mmm.config import ConfigError

TINY = str(REPO / "configs" / "text_mlm_tiny.yaml")


_tiny_argv = tiny_argv


_error = error_line


# ------------------------------------------------------------------------------------------ max_steps


@pytest.mark.parametrize("steps", [-1, 0])
def test_max_steps_below_one_is_refused(steps, tmp_path, capsys):
    assert main(_tiny_argv(tmp_path / "run", **{"trainer.max_steps": steps})) == 2
    assert f"trainer.max_steps must be >= 1, got {steps}" in _error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("steps", ["-1", "0"])
def test_demo_max_steps_below_one_is_refused_before_the_demo_starts(steps, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--parts", "text", "--max_steps", steps, "--no_progress"]) == 2
    assert f"--max_steps must be >= 1" in _error(capsys, "demo") and not out.exists()


def test_a_config_built_in_python_is_checked_too(tmp_path):
    from mmm.train.pretrain import build_run

    cfg = tiny_config(tmp_path / "run")
    cfg.trainer.max_steps = 0
    with pytest.raises(ConfigError, match=r"trainer.max_steps must be >= 1, got 0"):
        build_run(cfg)
    cfg.trainer.max_steps, cfg.data.batch_size = 2, -4
    with pytest.raises(ConfigError, match=r"data.batch_size must be >= 1, got -4"):
        build_run(cfg)
    assert not (tmp_path / "run").exists()


def test_resuming_a_checkpoint_already_past_max_steps_is_refused(run_copy, capsys):
    last = run_copy / "checkpoints" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=True)
    ck["global_step"] = 40
    torch.save(ck, last)
    before = (run_copy / "config.yaml").read_text()
    assert main(_tiny_argv(run_copy, **{"trainer.ckpt_path": "last", "trainer.max_steps": 10})) == 2
    line = _error(capsys)
    assert "trainer.max_steps 10 leaves nothing to train" in line and "already at step 40" in line and str(last) in line
    assert (run_copy / "config.yaml").read_text() == before


def test_resume_with_changed_settings_that_fit_logs_them(run_copy, caplog):
    from mmm.config import load_config
    from mmm.train.pretrain import build_run

    overrides = {**TINY_OVERRIDES, "trainer.default_root_dir": str(run_copy), "data.val": None,
                 "trainer.ckpt_path": "last", "trainer.max_steps": 5, "model.encoder.dropout": 0.2}
    with caplog.at_level(logging.WARNING, logger="mmm.train"):
        build_run(load_config(TINY, overrides))
    assert "model.encoder.dropout: 0.0 -> 0.2" in caplog.text and "trainer.max_steps: 3 -> 5" in caplog.text
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["model"]["encoder"]["dropout"] == 0.2


# ------------------------------------------------------------------------------------------ tokenizer reuse


def test_run_folder_tokenizer_of_another_vocab_size_is_refused(run_copy, capsys):
    assert main(_tiny_argv(run_copy, **{"model.text.vocab_size": 1000, "trainer.max_steps": 2})) == 2
    line = _error(capsys)
    tok = run_copy / "tokenizer" / "tokenizer.json"
    assert str(tok) in line and "model.text.vocab_size is 1000" in line and "vocab_size 500" in line


def test_run_folder_tokenizer_without_a_fit_record_is_checked_by_its_size(run_copy, capsys):
    (run_copy / "tokenizer" / "fitted_with.json").unlink()  # a folder written before the record existed
    assert main(_tiny_argv(run_copy, **{"model.text.vocab_size": 100, "trainer.max_steps": 2})) == 2
    line = _error(capsys)
    assert "model.text.vocab_size is 100" in line and "holds 500 tokens" in line


def test_run_folder_tokenizer_of_another_algorithm_is_refused(run_copy, capsys):
    assert main(_tiny_argv(run_copy, **{"model.text.tokenizer": "bpe", "trainer.max_steps": 2})) == 2
    assert "model.text.tokenizer is 'bpe' but it was trained with 'wordpiece'" in _error(capsys)


def test_tokenizer_path_that_differs_from_the_run_folders_is_refused(run_copy, tmp_path, capsys):
    from mmm.modalities.text.tokenizer import train_wordpiece

    other = tmp_path / "other_tok"
    train_wordpiece(["completely different words here"] * 20 + ["zebra quartz"] * 5, vocab_size=60).save(other)
    assert main(_tiny_argv(run_copy, **{"model.text.tokenizer_path": str(other), "trainer.max_steps": 2})) == 2
    line = _error(capsys)
    assert f"model.text.tokenizer_path {other} differs" in line and str(run_copy / "tokenizer") in line


# ------------------------------------------------------------------------------------------ CLI choices


def test_list_of_an_unknown_kind_lists_the_known_ones(capsys):
    assert main(["list", "nope"]) == 2
    line = _error(capsys, "list")
    assert "unknown kind 'nope'" in line and "masker" in line and "objective" in line
    assert main(["list", "masker"]) == 0
    assert capsys.readouterr().out.startswith("masker: ")


@pytest.mark.parametrize("parts,message", [("", "--parts names no part"), (" , ", "--parts names no part"),
                                           ("text,nope", "unknown part(s) 'nope' in --parts; valid parts: text")])
def test_demo_parts_must_name_known_parts(parts, message, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--parts", parts, "--no_progress"]) == 2
    assert message in _error(capsys, "demo") and not out.exists()


def test_pretrain_without_a_config_does_not_start_a_default_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain"]) == 2
    line = _error(capsys)
    assert "no --config given" in line and "--defaults" in line and "text_mlm_tiny.yaml" in line
    assert main(["pretrain", "--trainer.max_steps", "3"]) == 2
    assert "no --config given" in _error(capsys)
    assert main(["prepare"]) == 2
    assert "no --config given" in _error(capsys, "prepare")
    assert not (tmp_path / "runs").exists()
    assert main(["pretrain", "--defaults", "--trainer.max_steps", "0"]) == 2  # the opt-in reaches the config checks
    assert "trainer.max_steps must be >= 1" in _error(capsys)


# ------------------------------------------------------------------------------------------ hints


def test_bad_sample_hint_names_the_config_key():
    from mmm.data.stream import SampleError, SampleErrorHandler

    with pytest.raises(SampleError) as info:
        SampleErrorHandler(skip_bad=False)(ValueError("broken"))
    assert "data.skip_bad: true" in str(info.value) and "skip_bad=True" not in str(info.value)


def test_bad_input_hint_of_a_shard_build_names_the_flag(tmp_path, capsys):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("Masked language models read text with holes. " * 40, encoding="utf-8")
    (src / "empty.txt").write_text("", encoding="utf-8")
    assert main(["shards", "build", str(src), str(tmp_path / "out")]) == 2
    line = _error(capsys, "shards build")
    assert "empty.txt" in line and "--skip_bad" in line


# ------------------------------------------------------------------------------- refused before the fit


@pytest.mark.parametrize("overrides, message", [
    ({"model.encoder.heads": 3}, r"model.encoder.dim \(64\) must be divisible by model.encoder.heads \(3\)"),
    ({"model.encoder.relative_position": "rotary", "model.encoder.heads": 64},
     r"model.encoder.relative_position: rotary needs an even head width, and model.encoder.dim / heads is 64 / 64 = 1"),
    ({"trainer.devices": 0}, r"trainer.devices must be a positive number of devices, -1 \(all\), 'auto', or device "
                             r"indices such as '0,1'; got 0"),
    ({"trainer.devices": "many"}, r"trainer.devices must be .*; got 'many'"),
    ({"trainer.devices": ","}, r"trainer.devices must be .*; got ','"),
    ({"objectives": [{"name": "mlm", "args": {"dim": 32}}]},
     r"objectives\[0\].args \(objective 'mlm'\): 'dim' is set by mmm itself \(from model.encoder.dim\); remove it"),
    ({"objectives": [{"name": "mlm", "args": {"tie_weight": True}}]},
     r"objectives\[0\].args \(objective 'mlm'\) got unknown argument\(s\) \['tie_weight'\]; accepted: "
     r"\['tie_weights', 'modality', 'decoder_layers'\]"),
    ({"optim.args": {"lr": 0.1}}, r"optim.args \(optimizer 'adamw'\): 'lr' is set by mmm itself \(from optim.lr\)"),
    ({"optim.name": "sophia", "optim.args": {"hessian_evry": 5}},
     r"optim.args \(optimizer 'sophia'\) got unknown argument\(s\) \['hessian_evry'\]"),
])
def test_settings_the_model_or_trainer_would_refuse_late_are_refused_before_anything_is_written(
        overrides, message, tmp_path, capsys):
    """These ended after the tokenizer's fit (minutes on real data), several as a bare TypeError or as
    Lightning's exception with exit status 1."""
    assert main(_tiny_argv(tmp_path / "run", **overrides)) == 2
    assert re.search(message, _error(capsys))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("devices", [1, "1", "auto", -1, "0,", "0,1", 2])
def test_the_device_forms_lightning_reads_pass_the_early_check(tmp_path, devices):
    from mmm.train.settings_check import _check_devices

    _check_devices(tiny_config(tmp_path / "run", **{"trainer.devices": devices}))

