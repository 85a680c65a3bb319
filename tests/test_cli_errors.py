"""Issue 13 §1: every failure a user can cause ends as one ``mmm <command>: error: ...`` line, no traceback.

Resumes use a copy of the session's tiny 3-step run folder (conftest ``ckpt``), so no test here
trains more than a step.
"""
import errno
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_OVERRIDES, error_line, tiny_argv
from mmm.cli import main

TINY = str(REPO / "configs" / "text_mlm_tiny.yaml")


_tiny_argv = tiny_argv


_error_line = error_line


# ------------------------------------------------------------------------------------------ checkpoints


def test_resume_from_a_truncated_checkpoint_names_the_file(run_copy, capsys):
    last = run_copy / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    code = main(_tiny_argv(run_copy, **{"trainer.ckpt_path": "last", "trainer.max_steps": 5}))
    line = _error_line(capsys)
    assert code == 2
    assert str(last) in line and "truncated or corrupt" in line


def test_resume_from_a_checkpoint_carrying_code_is_refused_in_one_line(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    ck = torch.load(run_copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ck["payload"] = Payload()
    torch.save(ck, evil)
    code = main(_tiny_argv(run_copy, **{"trainer.ckpt_path": str(evil), "trainer.max_steps": 5}))
    line = _error_line(capsys)
    assert code == 2 and not marker.exists()
    assert f"refusing to load {evil}" in line and "weights_only" in line


def test_resume_with_another_encoder_width_lists_the_changed_settings_and_keeps_config_yaml(run_copy, capsys):
    before = (run_copy / "config.yaml").read_text()
    code = main(_tiny_argv(run_copy, **{"trainer.ckpt_path": "last", "trainer.max_steps": 5,
                                        "model.encoder.dim": 32, "model.encoder.heads": 2}))
    line = _error_line(capsys)
    assert code == 2
    assert "does not fit the model" in line and str(run_copy / "checkpoints" / "last.ckpt") in line
    assert "model.encoder.dim: 64 -> 32" in line and "model.encoder.heads: 4 -> 2" in line
    assert (run_copy / "config.yaml").read_text() == before, "a refused resume must not rewrite config.yaml"
    assert yaml.safe_load(before)["model"]["encoder"]["dim"] == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_xformers_attention_without_cuda_is_refused_before_anything_is_built(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(_tiny_argv(run_dir, **{"model.encoder.attention": "xformers", "trainer.max_steps": 2}))
    line = _error_line(capsys)
    assert code == 2
    assert "model.encoder.attention: xformers needs a CUDA GPU" in line and "sdpa" in line
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "tokenizer").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_xformers_from_the_environment_is_named_as_such(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMM_ATTENTION", "xformers")
    assert main(_tiny_argv(tmp_path / "run", **{"trainer.max_steps": 2})) == 2
    assert "$MMM_ATTENTION (model.encoder.attention is auto): xformers needs a CUDA GPU" in _error_line(capsys)


@pytest.mark.parametrize("value, message", [
    ("bogus", r"\$MMM_ATTENTION \(model.encoder.attention is auto\): unknown attention backend 'bogus'; known: auto, "),
    ("SDPA", r"unknown attention backend 'SDPA'"),
])
def test_an_unknown_backend_from_the_environment_is_refused_before_the_fit_naming_the_variable(
        tmp_path, capsys, monkeypatch, value, message):
    """It was refused only at the first training step, after the tokenizer's fit, naming no variable."""
    monkeypatch.setenv("MMM_ATTENTION", value)
    assert main(_tiny_argv(tmp_path / "run", **{"trainer.max_steps": 2})) == 2
    assert re.search(message, _error_line(capsys)) and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_flex_without_cuda_and_xformers_with_alibi_are_refused_before_the_fit(tmp_path, capsys):
    assert main(_tiny_argv(tmp_path / "run", **{"model.encoder.attention": "flex"})) == 2
    assert "model.encoder.attention: flex (FlexAttention) compiles for CUDA only here" in _error_line(capsys)
    assert main(_tiny_argv(tmp_path / "run", **{"model.encoder.attention": "xformers",
                                                "model.encoder.relative_position": "alibi"})) == 2
    assert "model.encoder.attention: xformers applies no ALiBi bias" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_fsdp_without_cuda_is_refused_before_anything_is_built(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(_tiny_argv(run_dir, **{"trainer.strategy": "fsdp", "trainer.devices": 2, "trainer.max_steps": 2}))
    line = _error_line(capsys)
    assert code == 2
    assert "trainer.strategy: fsdp needs CUDA GPUs" in line and "ddp" in line
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "tokenizer").exists()


# ------------------------------------------------------------------------------------------ config values


@pytest.mark.parametrize("overrides,expected", [
    ({"masking.args.ratio": 1.5}, "masking: ratio must be a number strictly between 0 and 1, got 1.5"),
    ({"masking.args.ratoi": 0.2}, "masking: masker 'bert_random' got unknown argument(s) ['ratoi']"),
    ({"masking.name": "span", "masking.args.max_span": 0}, "masking: max_span must be"),
    ({"masking.name": "spam"}, "masking: unknown masker 'spam'; known maskers: "),
])
def test_bad_masking_settings_are_refused_before_the_tokenizer_is_fitted(overrides, expected, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_tiny_argv(run_dir, **{"trainer.max_steps": 2, **overrides})) == 2
    assert expected in _error_line(capsys)
    assert not (run_dir / "tokenizer").exists() and not (run_dir / "config.yaml").exists()


def test_a_masker_the_modality_cannot_use_names_the_task_s_masking_field(tmp_path, capsys):
    cfg = yaml.safe_load((REPO / "configs" / "multimodal_tiny.yaml").read_text())
    names = [t["name"] for t in cfg["tasks"]]
    i = names.index("image")
    assert main(["pretrain", "--config", str(REPO / "configs" / "multimodal_tiny.yaml"),
                 f"--tasks.{i}.masking.args.ratio", "2", "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    assert f"tasks[{i}].masking (task 'image'): ratio must be a number strictly between 0 and 1, got 2" in _error_line(capsys)
    assert main(_tiny_argv(tmp_path / "run2", **{"trainer.max_steps": 2, "masking.name": "mae_random"})) == 2
    assert "masking: masking.name 'mae_random' does not mask" in _error_line(capsys)


@pytest.mark.parametrize("key,value", [("trainer.max_steps", -5), ("data.batch_size", 0), ("data.batch_size", -4),
                                       ("data.max_errors", -1), ("model.encoder.dropout", 1.5), ("optim.lr", 0)])
def test_out_of_range_values_are_refused_at_load_naming_the_key(key, value, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_tiny_argv(run_dir, **{key: value})) == 2
    line = _error_line(capsys)
    assert f"override --{key}: {key} must be" in line and f"got {value}" in line
    assert "cannot pack" not in line and not run_dir.exists()


def test_out_of_range_value_in_a_yaml_file_names_the_file(tmp_path, capsys):
    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["data"]["batch_size"] = -4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", "--config", str(path)]) == 2
    assert f"{path}: data.batch_size must be >= 1, got -4" in _error_line(capsys)


# ------------------------------------------------------------------------------------------ data errors


def _shards_with_bad_samples(folder: Path, good: int, bad: int) -> Path:
    folder.mkdir(parents=True)
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for i in range(good + bad):
            payload = (b"\xff\xfe not utf-8 " * 3) if i % 2 and i // 2 < bad else \
                f"document {i} about masked language models and encoders.".encode()
            info = tarfile.TarInfo(f"s{i:04d}.txt")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return folder


def test_max_errors_exceeded_is_one_line_with_the_limit_and_the_last_error(ckpt, tmp_path, capsys):
    shards = _shards_with_bad_samples(tmp_path / "shards", good=12, bad=3)
    argv = _tiny_argv(tmp_path / "run", **{"data.train": str(shards), "data.skip_bad": True, "data.max_errors": 1,
                                           "trainer.max_steps": 2, "model.text.tokenizer_path": str(ckpt.parents[1] / "tokenizer")})
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "too many bad samples in one pass over the data: 2 > data.max_errors=1" in line
    assert "last: " in line and "'txt' is not UTF-8" in line


def test_training_shards_without_a_usable_sample_stop_instead_of_looping(ckpt, tmp_path, capsys):
    """Every sample bad and skipped: each epoch is empty, and Lightning would start new ones forever."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-000000.tar", "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"s{i:04d}.txt")
            payload = b"\xff\xfe not utf-8"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    argv = _tiny_argv(tmp_path / "run", **{"data.train": str(shards), "data.skip_bad": True, "data.num_workers": 1,
                                           "trainer.max_steps": 2, "model.text.tokenizer_path": str(ckpt.parents[1] / "tokenizer")})
    assert main(argv) == 2
    assert _error_line(capsys) == ("mmm pretrain: error: the training shards yielded no batch in a whole epoch (epoch 0): "
                                   "empty shards, or "
                                   "every sample was bad and skipped (3 bad sample(s) or shard(s) counted)")


def test_an_error_from_a_dataloader_worker_is_reduced_to_its_own_line():
    from torch._utils import ExceptionWrapper

    from mmm.data.stream import SampleError
    from mmm.errors import one_line

    try:
        raise SampleError("too many bad samples: 2 > data.max_errors=1 (ValueError=2); last: bad txt")
    except SampleError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(SampleError) as info:
        wrapped.reraise()
    assert "Traceback" in str(info.value)  # what torch hands over: the worker's whole traceback
    text = one_line(info.value, known=True)
    assert "\n" not in text and "Traceback" not in text
    assert text.startswith("too many bad samples: 2 > data.max_errors=1 (ValueError=2); last: bad txt")
    assert "worker process 0" in text


def test_a_chained_error_from_a_dataloader_worker_is_reduced_to_its_own_line():
    """A SampleError raised from a cause that has no traceback of its own (the tar reader's ShardReadError):
    torch's message then starts with the cause's error line, not with "Traceback"."""
    from torch._utils import ExceptionWrapper

    from mmm.data.stream import SampleError
    from mmm.data.tar import ShardReadError
    from mmm.errors import one_line

    cause = ShardReadError("unreadable tar at byte 0, before any member", "/data/train-000000.tar")
    try:
        raise SampleError("ShardReadError in shard /data/train-000000.tar: unreadable tar at byte 0") from cause
    except SampleError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(SampleError) as info:
        wrapped.reraise()
    assert str(info.value).startswith("Caught SampleError in DataLoader worker process 0.\nOriginal mmm.data.tar")
    text = one_line(info.value, known=True)
    assert text == ("ShardReadError in shard /data/train-000000.tar: unreadable tar at byte 0 "
                    "(in DataLoader worker process 0)")


# ------------------------------------------------------------------------------------------ full disk


def test_disk_full_while_saving_a_checkpoint_names_the_checkpoint(ckpt, tmp_path, capsys, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    def full(self, checkpoint, path, storage_options=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full)
    run_dir = tmp_path / "run"
    argv = _tiny_argv(run_dir, **{"trainer.max_steps": 1, "model.text.tokenizer_path": str(ckpt.parents[1] / "tokenizer")})
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "no space left on device" in line and str(run_dir / "checkpoints") in line
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*")), "the temporary file must not be left behind"


def test_disk_full_while_building_shards_names_the_output(tmp_path, capsys, monkeypatch):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("Masked language models read text with holes. " * 40, encoding="utf-8")

    def full(self, tarinfo, fileobj=None, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    out = tmp_path / "shards"
    assert main(["shards", "build", str(src), str(out)]) == 2
    line = _error_line(capsys, "shards build")
    assert "no space left on device" in line.lower() and str(out) in line


def test_shards_output_under_a_regular_file_is_one_line(tmp_path, capsys):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("Masked language models read text with holes. " * 40, encoding="utf-8")
    (tmp_path / "file").write_text("x")
    assert main(["shards", "build", str(src), str(tmp_path / "file" / "out")]) == 2
    assert str(tmp_path / "file") in _error_line(capsys, "shards build")


# ------------------------------------------------------------------------------------------ last resort


def test_an_unexpected_error_is_one_line_with_its_type_and_a_debug_hint(capsys, monkeypatch):
    import mmm.cli

    def broken(ns, rest):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(mmm.cli, "_cmd_list", broken)
    monkeypatch.delenv("MMM_DEBUG", raising=False)
    assert main(["list"]) == 1
    line = _error_line(capsys, "list")
    assert line == ("mmm list: error: RuntimeError: boom second line (unexpected error; rerun with --debug or "
                    "MMM_DEBUG=1 for the traceback)")

    for argv, env in ((["--debug", "list"], None), (["list", "--debug"], None), (["list"], "1")):
        if env:
            monkeypatch.setenv("MMM_DEBUG", env)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err, argv


def test_the_command_exits_nonzero_without_a_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MMM_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "mmm.cli", "pretrain", "--config", TINY, "--data.batch_size", "-4",
                           "--trainer.default_root_dir", str(tmp_path / "run")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("mmm pretrain: error: override --data.batch_size: "
                                                            "data.batch_size must be >= 1, got -4")


# ------------------------------------------------------------------------------------------ review of 2026-12-05


def test_config_files_and_values_that_were_accepted_or_crashed_are_refused_by_name(tmp_path, capsys):
    """A section of the wrong type was replaced by an override (`data: 5` + --data.batch_size 4 ran the defaults),
    a non-string key and a non-UTF-8 file ended in a TypeError or a message naming no file, an out-of-range seed and
    crop_scale [0.9, 0.2] were refused by Lightning / a data worker after the run folder was written."""
    cases = [("data5.yaml", "data: 5\n".encode(), {"data.batch_size": 4},
              "override --data.batch_size: data is int 5 in the config, not a section of settings"),
             ("keys.yaml", "trainer: {max_steps: 2, 3: 4}\n".encode(), {},
              "config key 3 in trainer is a int, not a name"),
             ("latin1.yaml", "trainer:\n  max_steps: 5  # caf\xe9\n".encode("latin-1"), {},
              "latin1.yaml: not UTF-8 text (byte 30 is 0xe9)")]
    for name, text, overrides, expected in cases:
        path = tmp_path / name
        path.write_bytes(text)
        args = ["pretrain", "--config", str(path), "--print_config"]
        for k, v in overrides.items():
            args += [f"--{k}", str(v)]
        assert main(args) == 2, name
        assert expected in _error_line(capsys), name
    for key, value, expected in (("seed", -1, "seed must be >= 0 and <= 4294967295, got -1"),
                                 ("data.seed", 2**32, "data.seed must be >= 0 and <= 4294967295")):
        run_dir = tmp_path / f"run_{key}"
        assert main(_tiny_argv(run_dir, **{key: value})) == 2
        assert expected in _error_line(capsys) and not run_dir.exists()
    run_dir = tmp_path / "run_crop"
    image = str(REPO / "configs" / "image_mae_tiny.yaml")
    assert main(["pretrain", "--config", image, "--trainer.default_root_dir", str(run_dir),
                 "--model.image.crop_scale", "[0.9, 0.2]"]) == 2
    assert "model.image.crop_scale must be [low, high] with low <= high, got [0.9, 0.2]" in _error_line(capsys)
    assert not run_dir.exists()


def test_plugin_after_the_command_and_before_its_positionals_and_a_closed_pipe(tmp_path):
    """`mmm list --plugin M modality` took the module as the kind and `modality` as the plug-in; `mmm list | head -1`
    ended in "error: broken pipe", exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MMM_DEBUG", None)
    toy = str(REPO / "tests" / "test_toy_modality.py")
    done = subprocess.run([sys.executable, "-m", "mmm.cli", "list", "--plugin", toy, "modality"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "toy" in done.stdout, done.stderr[-2000:]
    abbreviated = subprocess.run([sys.executable, "-m", "mmm.cli", "--plug", toy, "list", "modality"], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert abbreviated.returncode == 0 and "toy" in abbreviated.stdout, abbreviated.stderr[-2000:]
    piped = subprocess.run(f"{sys.executable} -m mmm.cli list | head -c 1", shell=True, env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, executable="/bin/bash")
    assert "broken pipe" not in piped.stderr and "Traceback" not in piped.stderr, piped.stderr[-2000:]
    status = subprocess.run(f"set -o pipefail; {sys.executable} -m mmm.cli list | head -c 1 > /dev/null", shell=True,
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, executable="/bin/bash")
    assert status.returncode == 0, status.stderr[-2000:]


def test_finetune_refuses_a_device_it_cannot_use_by_name():
    from mmm.downstream.finetune import checked_device

    with pytest.raises(ValueError, match=r"--device 'gpu0' is not a torch device name"):
        checked_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device 'cuda': this machine has no CUDA GPU"):
            checked_device("cuda")
    assert checked_device("cpu") == torch.device("cpu")
