"""The DNA part of ``mmm demo``: the k-mer-count baseline, and a few-step run end to end."""
from __future__ import annotations

import itertools
import json

import numpy as np
import torch
import webdataset as wds

from mmm.demo.dna import kmer_count_features, run_dna_demo


def test_kmer_counts_match_a_naive_count_and_skip_other_codes(tmp_path) -> None:
    seqs = ["ACGTACGTAA", "acgtNNacgt", "GGGGCCCCAT", "ACG"]
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        for i, s in enumerate(seqs):
            sink.write({"__key__": f"w{i}", "seq": s.encode(), "json": json.dumps({"label": i % 2}).encode()})
        sink.write({"__key__": "unlabelled", "seq": b"ACGTACGT", "json": b"{}"})
    x, y = kmer_count_features([str(tmp_path / "train-000000.tar")], k=3)
    assert x.shape == (4, 64) and y.tolist() == [0, 1, 0, 1]  # the unlabelled window is left out
    index = {"".join(p): i for i, p in enumerate(itertools.product("ACGT", repeat=3))}
    for row, s in zip(x, seqs):
        want = np.zeros(64)
        for j in range(len(s) - 2):
            if s[j:j + 3].upper() in index:
                want[index[s[j:j + 3].upper()]] += 1
        np.testing.assert_array_equal(row, want)
    assert kmer_count_features([str(tmp_path / "train-000000.tar")], k=3, max_samples=2)[0].shape == (2, 64)


def test_dna_demo_reports_trained_untrained_and_the_kmer_baseline(tmp_path) -> None:
    threads = torch.get_num_threads()
    m = run_dna_demo(tmp_path / "dna", max_steps=2, progress_bar=False, quick=True)
    assert torch.get_num_threads() == threads  # trainer.threads applies inside the part only
    assert m["threads"] == 1 and m["steps"] == 2
    assert set(m["linear_probe"]) == {"trained", "untrained"}
    kb = m["kmer_baseline"]
    assert kb["k"] == 4 and kb["test_samples"] == m["linear_probe"]["trained"]["test_samples"]
    assert kb["accuracy"] > kb["chance"] + 0.1  # motif classes show in 4-mer counts
    assert "| 4-mer counts (no network) |" in m["report"]
    # the better row is bold, not always "trained": the probe cell follows the measured accuracies
    acc = {k: m["linear_probe"][k]["accuracy"] for k in ("trained", "untrained")}
    rows = {line.split(" | ")[0].strip("|* "): line for line in m["report"].splitlines()
            if line.startswith(("| trained", "| **trained", "| untrained", "| **untrained"))}
    assert set(rows) == {"trained", "untrained (same init)"}
    for name, key, other in (("trained", "trained", "untrained"), ("untrained (same init)", "untrained", "trained")):
        probe_cell = rows[name].rstrip(" |").rsplit("| ", 1)[1]
        assert probe_cell.startswith("**") == (f"{acc[key]:.3f}" != f"{acc[other]:.3f}" and acc[key] > acc[other])
    assert (tmp_path / "dna" / "loss_curve.png").stat().st_size > 1000
