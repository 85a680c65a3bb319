"""The MLM training-step benchmark runs end to end on a micro config and reports what it promises."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from benchmarks import text_mlm_step as bench  # noqa: E402

MICRO = ["--config", "small", "--depth", "2", "--dim", "32", "--heads", "2", "--mlp-hidden", "64",
         "--vocab", "500", "--max-len", "32", "--batch", "4", "--steps", "2", "--warmup", "1", "--threads", "1"]


def test_micro_run_writes_json_and_parity_holds(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    report = bench.main(MICRO + ["--no-memory", "--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(report["results"]))
    assert set(data["env"]) >= {"device", "threads", "torch", "transformers"}
    (r,) = data["results"]
    assert r["config"]["depth"] == 2 and r["config"]["dim"] == 32 and r["config"]["vocab"] == 500
    assert 0 < r["masked_tokens"] < r["real_tokens"] <= r["padded_tokens"] == 4 * 32
    assert r["parity"]["max_abs_loss_diff"] < 1e-4
    for name in ("mmm", "hf"):
        e = r[name]
        assert len(e["step_times_s"]) == 2 and e["median_step_s"] > 0
        assert e["real_tokens_per_s"] > 0
        assert math.isfinite(e["final_loss"])
        assert {"step_peak_mib", "total_peak_mib"} <= set(e)
    assert r["speedup_paired_median"] > 0
    assert r["speedup_real_tokens_per_s"] == pytest.approx(
        r["mmm"]["real_tokens_per_s"] / r["hf"]["real_tokens_per_s"])
    table = md.read_text()
    assert "| mmm (packed) |" in table and "BertForMaskedLM" in table


def test_batches_are_the_same_sequences_for_both_models():
    cfg = bench.BenchConfig("t", depth=1, dim=8, heads=1, mlp_hidden=8, max_len=16, batch=3, vocab=100)
    b = bench.make_batches(cfg, seed=1)
    lengths = b.attention_mask.sum(1)
    assert int(lengths.sum()) == b.real_tokens == b.packed.num_tokens
    assert int(lengths.min()) >= 4 and int(lengths.max()) <= 16
    real = b.attention_mask.bool()
    assert b.input_ids[real].tolist() == b.packed.inputs["text"].ids.tolist()
    assert b.labels[b.labels != -100].tolist() == b.packed.targets["text"].labels.tolist()
    assert int((b.labels != -100).sum()) == b.masked_tokens


def test_weight_copy_gives_identical_losses():
    cfg = bench.BenchConfig("t", depth=2, dim=16, heads=2, mlp_hidden=32, max_len=16, batch=3, vocab=64)
    check = bench.parity(cfg, bench.make_batches(cfg, seed=2), seed=3)
    assert check["max_abs_loss_diff"] < 1e-5


def test_memory_child_reports_peaks(capsys):
    """The subprocess entry point (run in-process here to keep the test fast) prints one JSON line."""
    cfg = bench.BenchConfig("t", depth=1, dim=16, heads=2, mlp_hidden=32, max_len=16, batch=3, vocab=64)
    cfg_json = json.dumps(bench.asdict(cfg))
    for contender in ("mmm", "hf"):
        bench.main(["--_memory-child", contender, "--_cfg", cfg_json])
        line = capsys.readouterr().out.strip().splitlines()[-1]
        peaks = json.loads(line)
        assert set(peaks) == {"step_peak_mib", "total_peak_mib"}
        for v in peaks.values():
            assert v is None or v >= 0
