"""The loader benchmark runs end to end on toy sizes and reports what it promises (no timing assertions)."""
from __future__ import annotations

import json

from benchmarks import loader as bench


def test_micro_run_reports_every_loader_and_the_training_rate(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    report = bench.main(["--micro", "--workers", "0,1", "--work", str(tmp_path / "work"), "--threads", "1",
                         "--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert [r["modality"] for r in data["results"]] == ["text", "image"]
    for r in data["results"]:
        assert [(x["source"], x["workers"]) for x in r["loaders"]] == [
            ("shards", 0), ("files", 0), ("shards", 1), ("files", 1)]
        for x in r["loaders"]:
            assert x["batches"] == 2 and x["sequences"] > 0 and x["sequences_per_s"] > 0
            assert x["vs_training"] == x["sequences_per_s"] / r["train"]["sequences_per_s"]
        assert all(x["shards_vs_files"] > 0 for x in r["loaders"] if x["source"] == "shards")
        assert r["train"]["sequences_per_s"] > 0 and r["shards"] == bench.SHARDS
        tr = r["transfer"]  # the hand-over timing, both ways (2 batches x 2 rounds at --micro)
        assert tr["batches"] == 4 and tr["one_message_ms"] > 0 and tr["usual_way_ms"] > 0
        assert tr["speedup"] == tr["usual_way_ms"] / tr["one_message_ms"]
    assert report["markdown"] == md.read_text().strip()
    assert "| image | 4 |" in report["markdown"] and "as one message (mmm.data.wire)" in report["markdown"]
    assert "| text | one file per sample | 1 |" in report["markdown"]


def test_shards_and_files_hold_the_same_samples(tmp_path):
    samples = [{"__key__": f"s{i:03d}", "txt": f"sample {i}".encode(), "json": b"{}"} for i in range(10)]
    urls, folder = bench.write_copies(samples, tmp_path)
    from mmm.data.stream import make_pipeline

    from_shards = sorted((s["__key__"], s["txt"]) for s in make_pipeline(urls, stages=[], shuffle_buffer=0))
    from_files = sorted((s["__key__"], s["txt"]) for s in bench.FolderSamples(folder))
    assert from_shards == from_files == sorted((s["__key__"], s["txt"]) for s in samples)


def test_the_usual_way_leaves_out_only_the_wire_stage(tmp_path):
    import dataclasses

    from conftest import tiny_config
    from mmm.data.wire import to_wire
    from mmm.train.pretrain import build_run

    run = build_run(tiny_config(tmp_path / "run", **{"data.val": None}))
    dm = run.datamodule
    loader = type(dm)(dataclasses.replace(dm.cfg, num_workers=1), dm.tasks).task_loader()
    usual = bench._usual_way(loader)
    assert loader.dataset.pipeline[-1] is to_wire and to_wire not in usual.dataset.pipeline
    assert list(usual.dataset.pipeline) == list(loader.dataset.pipeline)[:-1]
    assert usual.num_workers == loader.num_workers == 1
