"""benchmarks.demo_probe: a candidate preset at the demo part's compute, through the demo's own code."""
import json

import pytest

from benchmarks import demo_probe


def test_candidate_gets_the_demo_compute_and_both_presets_are_probed(tmp_path):
    report = demo_probe.main(["--part", "image", "--candidate", "configs/image_mp3_tiny.yaml", "--seeds", "0",
                              "--max_steps", "5", "--quick", "--out", str(tmp_path)])
    plan = report["plan"]
    fps = plan["gflop_per_step"]
    # MP3 encodes half the patches, MAE a quarter: more FLOPs per step, so fewer steps for the same budget
    assert fps["candidate"] > fps["default"] and plan["steps"]["default"] == 5
    assert plan["steps"]["candidate"] == round(5 * fps["default"] / fps["candidate"])
    for name in ("default", "candidate"):
        (row,) = report["results"][name]
        assert 0.0 <= row["trained"] <= 1.0 and 0.0 <= row["untrained"] <= 1.0
        assert row["margin"] == pytest.approx(row["trained"] - row["untrained"])
    assert json.loads((tmp_path / "demo_probe.json").read_text())["summary"].keys() == {"default", "candidate"}


def test_a_missing_candidate_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo_probe.main(["--part", "image", "--candidate", "configs/nope.yaml", "--out", str(tmp_path)])
    assert "configs/nope.yaml: no such file" in capsys.readouterr().err
