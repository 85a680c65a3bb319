"""benchmarks.step_parts at micro size: both contenders' step split into encoder and head, per-part FLOPs."""
from __future__ import annotations

import json

import pytest

from benchmarks import step_parts
from benchmarks.flops import BertShape, step_flops


def test_micro_run_splits_both_steps(tmp_path):
    r = step_parts.main(["--micro", "--batches", "3", "--rounds", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["size"] == "micro"
    assert "encoder" in (tmp_path / "results.md").read_text()
    for side in ("mmm", "hf"):
        c = r["contenders"][side]
        assert c["flops"]["step"] == c["flops"]["encoder"] + c["flops"]["head"] > 0
        assert c["cpu_s"]["step"] > 0 and c["cpu_s"]["encoder"] > 0
        assert c["share_of_time"]["encoder"] + c["share_of_time"]["head"] == pytest.approx(1.0)
    # HF predicts at every position, mmm at the masked ones: HF's head is the larger share of its FLOPs
    assert r["contenders"]["hf"]["share_of_flops"]["head"] > r["contenders"]["mmm"]["share_of_flops"]["head"]


def test_summary_ratio_at_hf_part_rates_is_one_for_identical_flops():
    shape = BertShape(dim=8, depth=1, mlp_hidden=16, vocab=50)
    parts = [{"linear": 600, "attention": 200, "head": 200}]
    times = {s: {"step": [1.1], "encoder": [1.0]} for s in ("mmm", "hf")}  # the head runs 2.5x the encoder's rate
    r = step_parts.summarise(shape, {"mmm": parts, "hf": parts}, times, {"size": "x", "batches": 1, "rounds": 1})
    assert r["ratios"]["step_at_hf_part_rates"] == pytest.approx(1.0)
    assert r["contenders"]["hf"]["gflops_per_s"]["encoder"] == pytest.approx(800 / 1.0 / 1e9)
    # fewer head FLOPs on mmm's side, at HF's part rates: the fast head's share shrinks, so the step ratio drops
    # (820 FLOPs in 1.01 s against HF's 1000 in 1.1 s: 0.893)
    small_head = [{"linear": 600, "attention": 200, "head": 20}]
    r2 = step_parts.summarise(shape, {"mmm": small_head, "hf": parts}, times, {"size": "x", "batches": 1, "rounds": 1})
    assert r2["ratios"]["step_at_hf_part_rates"] == pytest.approx((820 / 1.01) / (1000 / 1.1))
    assert step_flops(shape, [4, 4], 2) == sum(step_parts.step_flops_parts(shape, [4, 4], 2).values())


def test_rejects_too_few_batches():
    with pytest.raises(SystemExit):
        step_parts.main(["--micro", "--batches", "2"])


def test_a_head_below_the_timing_noise_is_reported_as_such():
    shape = BertShape(dim=8, depth=1, mlp_hidden=16, vocab=50)
    parts = [{"linear": 600, "attention": 200, "head": 5}]
    times = {"mmm": {"step": [1.0], "encoder": [1.05]}, "hf": {"step": [1.1], "encoder": [1.0]}}
    r = step_parts.summarise(shape, {"mmm": parts, "hf": parts}, times, {"size": "x", "batches": 1, "rounds": 1})
    assert r["contenders"]["mmm"]["share_of_time"]["head"] is None
    assert r["contenders"]["mmm"]["gflops_per_s"]["head"] is None
    assert "below the noise" in step_parts.markdown(r)
