"""benchmarks/gpu_check.sh: skips cleanly without CUDA; its step functions run on CPU at tiny sizes."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[2]
TINY_BERT = {"depth": 1, "dim": 32, "heads": 2, "mlp_hidden": 64, "vocab": 300, "max_len": 32, "batch": 6}
TINY_MAE = {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2, "mlp_hidden": 64,
            "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}


def test_script_exits_0_on_cpu_and_reports_every_skip(tmp_path):
    out = tmp_path / "results.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = out.read_text()
    for title in gpu_check.TITLES.values():
        assert f"## {title}\n\nSkipped: {gpu_check.NO_CUDA}." in report
    assert "Nothing was measured" in report and "torch " in report
    assert done.stdout.count("skipped: no CUDA device") == len(gpu_check.SECTIONS)


def test_sync_free_step_runs_on_cpu():
    r = gpu_check.sync_free_step(torch.device("cpu"), "small", TINY_BERT, attention="sdpa")
    assert r["ok"] and r["backend"] == "sdpa" and torch.isfinite(torch.tensor(r["loss"]))


def test_mae_step_runs_on_cpu():
    r = gpu_check.mae_step(torch.device("cpu"), "small", batch=4, steps=1, warmup=0, overrides=TINY_MAE)
    assert r["images"] == 4 and r["images_per_s"] > 0 and r["peak_mib"] is None
    assert 4 < r["encoder_tokens"] < 4 * 17  # [CLS] + the visible quarter of 16 patches per image


@pytest.mark.gpu
def test_sync_check_catches_a_host_sync():
    """The check can fail: a ``.item()`` inside it raises."""
    x = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="synchroniz"):
        with gpu_check.sync_debug_errors(torch.device("cuda")):
            x.sum().item()
    assert torch.cuda.get_sync_debug_mode() == 0


def test_every_section_runs_at_smoke_size_on_cpu(tmp_path):
    """The sections the GPU run will execute, end to end on CPU at tiny sizes (report format included)."""
    out = tmp_path / "results.md"
    status = gpu_check.run(out, budget_s=600, device=torch.device("cpu"), sizes=gpu_check.SMOKE)
    report = out.read_text()
    assert status == {name: "ran" for name in gpu_check.SECTIONS}, report[-3000:]
    assert "no host sync" in report  # the check is a no-op on CPU, but the step ran
    assert "| 32 | mmm |" in report and "| 32 | hf |" in report  # MFU rows (n/a on CPU)
    assert "images/s" in report and "sdpa_padded" in report and "| 16 | sdpa (blocked) |" in report
    assert "| text_mlm_tiny.yaml | 32-true, adamw | 8 of 8 | 2, 6 | 0 | n/a (no CUDA) |" in report  # the loop section


@pytest.mark.gpu
def test_the_loop_check_files_cuda_syncs_under_the_step():
    from mmm.train.step_reads import _cuda_syncs_by_step

    class Trainer:
        global_step = 3

    found = {}
    x = torch.ones(3, device="cuda")
    with _cuda_syncs_by_step(Trainer(), found):
        x.sum().item()
    assert list(found) == [3] and len(found[3]) == 1
    assert torch.cuda.get_sync_debug_mode() == 0


def test_sync_free_mae_step_runs_on_cpu_under_the_host_read_detector():
    r = gpu_check.sync_free_mae_step(torch.device("cpu"), "small", batch=4, overrides=TINY_MAE, steps=2)
    assert r["ok"], r
    assert torch.isfinite(torch.tensor(r["loss"]))


def test_the_tests_section_keeps_what_finished_when_it_times_out(monkeypatch):
    """On a timeout subprocess hands back bytes whatever text= says (the report showed a b'...' repr), and with -q the
    per-test results only came in the final summary a killed run never prints; nor may the project's `-n auto`
    reach a device machine without pytest-xdist."""
    import subprocess

    seen = {}

    def timed_out(cmd, **kwargs):
        seen["cmd"] = cmd
        raise subprocess.TimeoutExpired(cmd, 5, output=b"tests/core/test_x.py::test_a PASSED  [ 50%]\n"
                                                      b"tests/core/test_x.py::test_b FAILED  [100%]\n")

    monkeypatch.setattr(gpu_check.subprocess, "run", timed_out)
    body = gpu_check.section_tests(torch.device("cpu"), 5, gpu_check.SMOKE)
    assert "-o addopts=" in " ".join(seen["cmd"]) and "-v" in seen["cmd"]
    assert "tests/core/test_x.py::test_a PASSED" in body and "test_b FAILED" in body and "b'" not in body
    assert "(timed out after 5 s)" in body


def test_the_mfu_section_measures_mmm_alone_without_transformers(monkeypatch):
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: None if name == "transformers"
                        else real(name, *a))
    body = gpu_check.section_mfu(torch.device("cpu"), 60, gpu_check.SMOKE)
    assert "| 32 | mmm |" in body and "| 32 | hf |" not in body and "no HF row" in body
