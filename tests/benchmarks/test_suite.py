"""The benchmark suite (``mmm bench``): sections, skip reasons, plots, eval on a real checkpoint, MFU formula."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import attention_backends, mfu, suite  # noqa: E402
from mmm.cli import main as cli_main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setenv(suite.MICRO_ENV, "1")


def _check_pngs(out, names):
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_throughput_suite_writes_sections_markdown_and_plots(tmp_path, micro):
    report = suite.run_suite("throughput", tmp_path, quick=True, log=lambda _: None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["suite"] == "throughput" and data["sizes"] == "micro"
    assert set(data["machine"]) >= {"cpu", "torch_threads", "gpu", "torch", "xformers", "transformers", "date"}
    s = data["sections"]
    assert set(s) == {"text_mlm_step", "image_mae_step", "loader", "e2e_pretrain", "attention_backends", "gpu_mlm"}
    (e2e,) = s["e2e_pretrain"]["results"]
    assert e2e["size"] == "micro" and e2e["mmm"]["tokens_per_s"] > 0 and e2e["hf"]["tokens_per_s"] > 0
    assert [r["modality"] for r in s["loader"]["results"]] == ["text"]
    assert s["loader"]["results"][0]["train"]["sequences_per_s"] > 0
    (step,) = s["text_mlm_step"]["results"]
    assert step["mmm"]["real_tokens_per_s"] > 0 and step["hf"]["real_tokens_per_s"] > 0

    sweep = s["attention_backends"]
    assert [p["max_len"] for p in sweep["points"]] == suite.SIZES["micro"].attn_lengths_cpu
    for p in sweep["points"]:
        assert sum(p["seqlens"]) == p["real_tokens"] == sweep["total_tokens"]
        for name, r in p["backends"].items():
            assert r["real_tokens_per_s"] > 0
            assert r["max_abs_diff_vs_math"] < 1e-4, name
        assert p["backends"]["math"]["speedup_vs_math"] == pytest.approx(1.0)
    if not torch.cuda.is_available():
        assert sweep["skipped"] == {"xformers": attention_backends.XFORMERS_CPU_REASON}
        assert set(sweep["contenders"]) == {"sdpa", "sdpa_padded", "math"}
        assert s["gpu_mlm"]["skipped"] == suite.NO_CUDA == "skipped: no CUDA device"
        assert "skipped: no CUDA device" in data["markdown"]
        assert all(r["peak_mib"] is None for p in sweep["points"] for r in p["backends"].values())

    md = (tmp_path / "results.md").read_text()
    assert md.strip() == report["markdown"].strip()
    assert "| mmm (packed) |" in md and "| sdpa_padded |" in md and "## Loader throughput" in md
    assert "## Whole pretraining runs: mmm vs HF Trainer" in md and "| mmm pretrain (packed) |" in md
    assert data["plots"] == ["throughput_mmm_vs_hf.png", "attention_backends.png"]
    _check_pngs(tmp_path, data["plots"])


def test_eval_suite_scores_trained_and_random_on_identical_masks(tmp_path, micro, ckpt):
    report = suite.run_suite("eval", tmp_path, quick=True, checkpoint=ckpt, log=lambda _: None)
    data = json.loads((tmp_path / "results.json").read_text())
    text = data["sections"]["eval"]["text"]
    assert text["val"] == "embedded" and "data.val: null" in text["note"]  # the fixture trains without val
    assert text["max_batches"] == suite.SIZES["micro"].eval_batches
    tr, rn = text["trained"], text["random_init"]
    for s in (tr, rn):
        assert 0.0 <= s["accuracy"] <= 1.0 and s["perplexity"] > 1.0 and s["predictions"] > 0
    assert tr["predictions"] == rn["predictions"] and tr["sequences"] == rn["sequences"]
    assert tr["loss"] != rn["loss"]  # the trained weights were loaded, not a second random init
    assert "random init (same config and seed)" in report["markdown"]
    _check_pngs(tmp_path, ["eval_trained_vs_random.png"])


def test_random_init_is_reproducible_from_the_checkpoint_seed(ckpt):
    from mmm.encoders import read_checkpoint

    contents = read_checkpoint(ckpt)
    settings = suite.EvalSettings(max_batches=1, device=torch.device("cpu"))
    a = suite.evaluate_text(contents, settings)["random_init"]
    b = suite.evaluate_text(contents, settings)["random_init"]
    assert a == b


def test_suite_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a checkpoint"):
        suite.run_suite("eval", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark suite"):
        suite.run_suite("latency", tmp_path)
    with pytest.raises(ValueError, match="takes no checkpoint"):
        suite.run_suite("throughput", tmp_path, checkpoint="x.ckpt")


def test_bert_base_flops_per_token_by_hand():
    # One BERT-base layer: QKV 3·(768·768 + 768) + output 768·768 + 768 + FFN 768·3072 + 3072
    # + 3072·768 + 768 + two LayerNorms 2·2·768 = 7,087,872 parameters; 12 layers = 85,054,464.
    n = 12 * (3 * (768 * 768 + 768) + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 4 * 768)
    assert n == 85_054_464
    # 6N = 510,326,784; attention 12·L·d·s = 12·12·768·512 = 56,623,104.
    assert mfu.flops_per_token(n, 12, 768, 512) == 566_949_888
    assert mfu.flops_per_token(n, 12, 768, 128) == 510_326_784 + 14_155_776

    from mmm.config import EncoderConfig
    from mmm.core.encoder import TransformerEncoder

    enc = TransformerEncoder(EncoderConfig(dim=768, depth=12, heads=12, mlp_hidden=3072))
    assert mfu.non_embedding_params(enc) == n


def test_mfu_helpers():
    assert mfu.effective_seq_len([100]) == 100
    assert mfu.effective_seq_len([3, 1]) == pytest.approx(10 / 4)
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    assert mfu.non_embedding_params(emb) == 4 * 3 + 3
    assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mfu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert mfu.peak_flops("NVIDIA H200") == 989e12
    assert mfu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert mfu.peak_flops("NVIDIA GeForce RTX 3090") is None and mfu.peak_flops(None) is None
    assert mfu.device_peak_flops(torch.device("cpu")) is None
    assert mfu.mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu.mfu(1000.0, 1e9, None) is None
    with pytest.raises(ValueError):
        mfu.flops_per_token(1, 1, 0, 10)


def test_gpu_mlm_measurement_runs_on_cpu_with_a_micro_model():
    """The CUDA section's code path, exercised on CPU (sdpa, bf16 autocast): no peak, so no MFU."""
    r = mfu.measure_mlm_step(32, 128, device=torch.device("cpu"), attention="sdpa", steps=2, warmup=1,
                             overrides=suite.SIZES["micro"].gpu_overrides, log=lambda _: None)
    assert r["peak_flops"] is None and r["mmm"]["mfu"] is None and r["hf"]["mfu"] is None
    assert r["flops_per_token"] == mfu.flops_per_token(r["non_embedding_params"], 1, 32, r["effective_seq_len"])
    assert r["mmm"]["real_tokens_per_s"] > 0 and r["speedup_real_tokens_per_s"] > 0
    assert 8 <= r["effective_seq_len"] <= 32


def test_spread_lengths_sum_and_range():
    import numpy as np

    lens = attention_backends.spread_lengths(512, 4096, np.random.default_rng(0))
    assert sum(lens) == 4096 and lens == sorted(lens, reverse=True)
    assert max(lens) <= 512 and all(n >= 128 for n in lens[:-1])


def test_cli_bench_quick_micro_run(tmp_path, micro, capsys):
    assert cli_main(["bench", "--suite", "throughput", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "## Attention backends" in out
    assert (tmp_path / "results.json").is_file()


def test_cli_bench_eval_without_checkpoint_exits_2(tmp_path, capsys):
    assert cli_main(["bench", "--suite", "eval", "--out", str(tmp_path)]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err


def test_the_whole_run_comparison_runs_in_a_fresh_process(monkeypatch, micro):
    """In the suite's own process HF's steps page-faulted 3-4x less (glibc's heap grown by the benchmarks before),
    which moved the tiny ratio from 1.15-1.17x to 1.04-1.07x; the suite now runs it in a process of its own."""
    from benchmarks import e2e_pretrain

    def not_here(*args, **kwargs):
        raise AssertionError("e2e_pretrain ran in the suite's process")

    monkeypatch.setattr(e2e_pretrain, "run_benchmark", not_here)
    logged = []
    report = suite.e2e_in_fresh_process(["micro"], logged.append)
    (r,) = report["results"]
    assert r["size"] == "micro" and r["mmm"]["tokens_per_s"] > 0 and r["hf"]["tokens_per_s"] > 0
    assert report["env"]["threads"] == e2e_pretrain.DEFAULT_THREADS
    assert logged and all(line.startswith("[micro]") for line in logged)


def test_a_failing_whole_run_process_is_reported_with_its_last_lines(monkeypatch):
    monkeypatch.delenv("MMM_BENCH_MICRO", raising=False)
    with pytest.raises(RuntimeError, match=r"(?s)benchmarks.e2e_pretrain --sizes no-such-size .*exited with 1; "
                                           r"its last lines:.*unknown size\(s\) \['no-such-size'\]"):
        suite.e2e_in_fresh_process(["no-such-size"], lambda _: None)
