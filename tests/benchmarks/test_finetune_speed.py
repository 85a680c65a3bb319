"""The fine-tuning speed benchmark (mmm finetune, with and without the [CLS]-only last block, vs HF Trainer) at
micro size: files, padding share, ceiling."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from benchmarks import finetune_speed as bench  # noqa: E402


def test_micro_run_writes_results_with_ceiling(tmp_path):
    report = bench.main(["--micro", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                        log=lambda _: None)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "results.md").read_text().strip() == report["markdown"].strip()
    r = data["result"]
    size = bench.SIZES["micro"]
    assert r["task"] == "stdlib-package" and r["classes"] >= 2
    assert r["same_token_ids"] == 1.0  # both sides train on the same token ids
    for name in ("mmm", "mmm_whole_last_block", "hf"):
        (run,) = r[name]["runs"]
        assert run["steps"] == size.steps - size.skip and run["seconds"] > 0
        assert run["examples"] == sum(b["rows"] for b in run["batches"][size.skip:])
        assert len(run["batches"]) == size.steps and all(b["rows"] <= size.batch_size for b in run["batches"])
        assert r[name]["examples_per_s"] == pytest.approx(run["examples"] / run["seconds"])
        assert r[name]["examples_per_cpu_s"] == pytest.approx(run["examples"] / run["cpu_seconds"])
        assert sum(run["step_seconds"]) == pytest.approx(run["seconds"], rel=1e-9)
        assert sum(run["step_examples"]) == run["examples"]
    hf_batches = r["hf"]["runs"][0]["batches"][size.skip:]
    share = bench.padding_share(hf_batches)
    assert 0 < share < 1 and r["hf"]["padding_share_computed"] == pytest.approx(share)
    assert r["ceiling"] == pytest.approx(1 / (1 - share))
    for name in ("mmm", "mmm_whole_last_block"):  # the default loop and packing alone, each against HF
        m = r[name]
        assert m["ratio"] == pytest.approx(m["examples_per_s"] / r["hf"]["examples_per_s"])
        assert m["share_of_ceiling"] == pytest.approx(m["ratio"] / r["ceiling"])
        assert m["cpu_ratio"] == pytest.approx(m["examples_per_cpu_s"] / r["hf"]["examples_per_cpu_s"])
        assert m["reaches_target"] == (m["share_of_ceiling"] >= 0.9)
        assert bench.LABELS[name] in report["markdown"]
    assert r["mmm"]["runs"][0]["batches"] == r["mmm_whole_last_block"]["runs"][0]["batches"]  # same data, same order
    assert r["subset_speedup"] == pytest.approx(r["mmm"]["examples_per_s"] / r["mmm_whole_last_block"]["examples_per_s"])
    assert "ceiling 1/(1−p)" in report["markdown"]
    if bench.minor_faults() is not None:  # page faults per timed step, both sides (Linux)
        assert all(r["minor_faults_per_step"][n] >= 0 for n in bench.CONTENDERS)
        assert "Minor page faults per timed step" in report["markdown"]


def test_padding_share_and_window():
    batches = [{"rows": 2, "width": 10, "real": 15}, {"rows": 1, "width": 5, "real": 5}]
    assert bench.padding_share(batches) == pytest.approx(5 / 25)
    w = bench.examples_window([1.0, 2.0, 4.0], [8, 8, 4], skip=1)
    assert w == {"steps": 2, "seconds": 3.0, "examples": 12, "examples_per_s": 4.0, "step_seconds": [1.0, 2.0],
                 "step_examples": [8, 4]}
    with pytest.raises(ValueError):
        bench.examples_window([1.0, 2.0], [8, 8], skip=2)


def test_cpu_window_is_the_same_window_in_cpu_time():
    assert bench.cpu_window([0.5, 1.0, 2.0], [8, 8, 4], skip=1) == {"cpu_seconds": 1.5, "examples_per_cpu_s": 8.0}


def test_faults_window_counts_the_timed_steps_only():
    assert bench.faults_window([100, 160, 400, 460], skip=1) == {"minor_faults_per_step": 120.0}
    assert bench.faults_window([None, None, None], skip=1) == {"minor_faults_per_step": None}
    assert bench.faults_window([5], skip=1) == {"minor_faults_per_step": None}
