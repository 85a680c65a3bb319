"""The whole-run benchmark (mmm pretrain vs HF Trainer) at micro size: files, FLOPs and the time split."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it

from benchmarks import e2e_pretrain as bench  # noqa: E402
from benchmarks.flops import BertShape, step_flops  # noqa: E402


def test_micro_run_writes_results_and_counts_flops(tmp_path):
    report = bench.main(["--micro", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                        log=lambda _: None)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["results"] == json.loads(json.dumps(report["results"]))
    assert (tmp_path / "out" / "results.md").read_text().strip() == report["markdown"].strip()
    (r,) = data["results"]
    size = bench.SIZES["micro"]
    assert r["size"] == "micro" and r["threads"] == bench.DEFAULT_THREADS
    shape = BertShape(**r["shape"])
    assert shape.dim == 32 and shape.depth == 1 and shape.vocab == r["vocab"] <= 300
    for name in ("mmm", "hf"):
        e = r[name]
        (run,) = e["runs"]
        assert run["steps"] == size.steps - size.skip and run["seconds"] > 0
        assert sum(run["step_seconds"]) == pytest.approx(run["seconds"], rel=1e-9)
        assert sum(run["step_tokens"]) == run["tokens"] and sum(run["step_flops"]) == run["flops"]
        assert e["window_tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])
        assert e["window_gflops_per_s"] == pytest.approx(run["flops"] / run["seconds"] / 1e9)
        rates = zip(run["step_tokens"], run["step_flops"], run["step_seconds"])
        assert e["tokens_per_s"] == pytest.approx(statistics.median(n / dt for n, _, dt in rates))
        assert e["gflops_per_s"] == pytest.approx(statistics.median(
            f / dt for f, dt in zip(run["step_flops"], run["step_seconds"])) / 1e9)
        assert e["matmul_limit"]["gflops_per_s"] > 0
        cpu = [f / dt for f, dt in zip(run["step_flops"], run["step_cpu_seconds"]) if dt > 0]
        assert len(run["step_cpu_seconds"]) == len(run["step_seconds"]) and all(dt >= 0 for dt in run["step_cpu_seconds"])
        assert e["cpu_gflops_per_s"] == pytest.approx(statistics.median(cpu) / 1e9)
        assert e["fraction_of_limit"] == pytest.approx(e["gflops_per_s"] / e["matmul_limit"]["gflops_per_s"])
    # HF: B full blocks of max_len tokens, logits at every position
    block, batch = r["max_len"], r["batch_size"]
    assert r["hf"]["runs"][0]["tokens"] == (size.steps - size.skip) * batch * block
    assert r["hf"]["flops_per_token"] == pytest.approx(step_flops(shape, [block] * batch, batch * block) / (batch * block))
    # mmm: packed sequences of at most max_len, the head on the masked ~15% only: fewer FLOPs per token
    m = r["mmm"]["runs"][0]
    assert 0 < m["predicted_per_step"] < m["tokens_per_step"] <= batch * block
    assert r["mmm"]["flops_per_token"] < r["hf"]["flops_per_token"]
    assert r["flops_ceiling"] == pytest.approx(r["hf"]["flops_per_token"] / r["mmm"]["flops_per_token"])
    # the split of mmm's timed steps adds up to their time
    assert sum(m["split_s"].values()) == pytest.approx(m["seconds"], rel=1e-9)
    assert all(v >= 0 for v in m["split_s"].values())
    assert sum(r["mmm"]["split_share"].values()) == pytest.approx(1.0)
    assert r["cpu_gflops_ratio"] == pytest.approx(r["mmm"]["cpu_gflops_per_s"] / r["hf"]["cpu_gflops_per_s"])
    assert "| mmm pretrain (packed) |" in report["markdown"] and "between steps" in report["markdown"]
    assert "Per CPU-second of the training thread" in report["markdown"]
    # one round: its ratio is the two runs' median step rates (micro has no target)
    assert r["round_gflops_ratios"] == pytest.approx([r["mmm"]["gflops_per_s"] / r["hf"]["gflops_per_s"]])
    assert "mmm/HF GFLOP/s per round (micro; " in report["markdown"]
    # page faults are counted per timed step (Linux); the allocator is reported as the user has it
    if bench.minor_faults() is not None:
        assert all(r[n]["minor_faults_per_step"] >= 0 for n in ("mmm", "hf"))
        assert "Minor page faults per timed step (micro" in report["markdown"]
    assert "Memory allocator: glibc default" in report["markdown"]


def test_window_times_steps_after_the_skipped_ones():
    steps = [{"end": t, "tokens": n, "flops": 10 * n} for t, n in ((1.0, 5), (1.5, 7), (2.5, 9), (3.0, 11))]
    w = bench.window(steps, skip=1)
    assert w["steps"] == 3 and w["seconds"] == pytest.approx(2.0)
    assert w["tokens"] == 27 and w["tokens_per_s"] == pytest.approx(13.5)
    assert w["flops_per_token"] == pytest.approx(10.0) and w["gflops_per_s"] == pytest.approx(135 / 1e9)
    with pytest.raises(ValueError):
        bench.window(steps, skip=0)
    with pytest.raises(ValueError):
        bench.window(steps, skip=4)


def test_group_texts_is_run_mlm_grouping():
    from mmm.modalities.text.tokenizer import train_wordpiece

    texts = ["the cat sat on the mat", "a dog ran", "the mat was red and the dog sat"] * 5
    tok = train_wordpiece(texts, vocab_size=60, min_frequency=1)
    hf_tok = bench.hf_tokenizer(tok)
    blocks = bench.group_texts(hf_tok, texts, 8)
    stream = [i for t in texts for i in [tok.cls_id, *tok.encode(t)[0].tolist(), tok.sep_id]]
    assert len(blocks) == len(stream) // 8
    assert [i for b in blocks for i in b["input_ids"]] == stream[:len(blocks) * 8]
    specials = [i for b in blocks for i in b["special_tokens_mask"]]
    assert specials == [int(i in (tok.cls_id, tok.sep_id)) for i in stream[:len(blocks) * 8]]


def test_keep_freed_memory_sets_glibc_and_faults_are_counted():
    """The allocator setting is accepted (in a fresh process, as the benchmark sets it first), and
    the fault counter sees a fresh 64 MiB tensor's pages. Whether glibc then reuses freed memory
    depends on whether its heap can grow in place (the address-space layout differs from run to
    run), so the benchmark reports the faults per step it measured rather than assuming the effect."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or bench.minor_faults() is None:
        pytest.skip("glibc's mallopt and the kernel's fault counts are Linux-only")
    script = ("import torch\n"
              "from benchmarks import e2e_pretrain as bench\n"
              "print(bench.keep_freed_memory())\n"
              "before = bench.minor_faults()\n"
              "x = torch.empty(16 * 1024 * 1024)\n"  # 64 MiB, new to this process: its 16k pages fault in
              "x.fill_(1.0)\n"
              "print(bench.minor_faults() - before)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    said, faults = out.stdout.strip().splitlines()[-2:]
    assert "keeps freed memory" in said
    assert int(faults) > 8000


def test_the_final_checkpoint_is_left_out_of_mmm_steps(tmp_path, monkeypatch):
    """mmm writes ``last.ckpt`` inside its last step; the clock must take that step's end before the write
    (a BERT-base ``last.ckpt`` made the base run's last step seconds long: 21% of the timed time 'after the step')."""
    import time

    from lightning.pytorch import Trainer

    size = bench.SIZES["micro"]
    tok_dir = tmp_path / "tok"
    tok = bench.train_tokenizer(bench.load_size_config(size, tmp_path / "cfg", 1), tok_dir)
    shape = bench.model_shape(bench.load_size_config(size, tmp_path / "cfg", 1, tok_dir), tok.vocab_size)
    saves = []
    real_save = Trainer.save_checkpoint

    def slow_save(self, *args, **kwargs):
        saves.append(args[0] if args else kwargs.get("filepath"))
        time.sleep(0.6)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_checkpoint", slow_save)
    w = bench.run_mmm(size, tmp_path / "work", 1, tok_dir, shape, "t")
    assert any(str(p).endswith("last.ckpt") for p in saves)  # the final checkpoint was written in the run
    assert w["split_s"]["after_step"] < 0.3 and max(w["step_seconds"]) < 0.6


def test_round_ratios_pair_each_rounds_runs():
    def run(rates):
        return {"step_flops": [10.0 * r for r in rates], "step_seconds": [10.0] * len(rates)}

    mmm = [run([2.0, 3.0, 4.0]), run([6.0, 6.0, 9.0])]
    hf = [run([1.0, 2.0, 5.0]), run([3.0, 4.0, 4.0])]
    assert bench.round_ratios(mmm, hf) == pytest.approx([1.5, 1.5])


def test_a_ratio_is_never_rounded_onto_the_other_side_of_its_target():
    """0.9953 printed as '1.00×' read as meeting a >= 1.0 target (the base run of 2026-12-04)."""
    assert bench.ratio_text(0.9953, 1.0) == "0.995×"
    assert bench.ratio_text(1.0951, 1.1) == "1.095×"
    assert bench.ratio_text(1.1549, 1.1) == "1.15×" and bench.ratio_text(0.9953) == "1.00×"
    assert bench.ratio_text(1.002, 1.0, "x") == "1.00x"


def test_bf16_run_computes_in_bf16_on_both_sides_and_times_bf16_gemms(tmp_path, monkeypatch):
    """--precision bf16-mixed: both contenders' linear layers run in bf16 (autocast), the matmul limit times bf16
    GEMMs, and the fp32 targets are not shown against a bf16 ratio."""
    timed = []
    real_time_gemm = bench.time_gemm

    def spy(m, k, n, repeats, dtype=torch.float32):
        timed.append(dtype)
        return real_time_gemm(m, k, n, repeats, dtype)

    monkeypatch.setattr(bench, "time_gemm", spy)
    report = bench.main(["--micro", "--precision", "bf16-mixed", "--out", str(tmp_path / "out"),
                         "--work", str(tmp_path / "work")], log=lambda _: None)
    (r,) = report["results"]
    assert r["precision"] == "bf16-mixed" and report["env"]["precision"] == "bf16-mixed"
    assert [x["linear_dtype"] for n in ("mmm", "hf") for x in r[n]["runs"]] == ["bfloat16", "bfloat16"]
    assert timed and set(timed) == {torch.bfloat16}
    assert r["target_gflops_ratio"] is None
    assert "bf16 autocast (bf16-mixed)" in report["markdown"] and "Matmul limit: bfloat16" in report["markdown"]


def test_a_side_that_did_not_run_in_the_asked_precision_stops_the_benchmark(tmp_path, monkeypatch):
    """If one side's autocast did not take (e.g. HF's Trainer ignoring bf16 on this machine), the report would compare
    bf16 with fp32: the benchmark refuses instead."""
    real_run_hf = bench.run_hf

    def fp32_hf(*args, **kwargs):
        return {**real_run_hf(*args, **kwargs), "linear_dtype": "float32"}

    monkeypatch.setattr(bench, "run_hf", fp32_hf)
    with pytest.raises(RuntimeError, match=r"hf's linear layers computed in float32, not bfloat16"):
        bench.main(["--micro", "--precision", "bf16-mixed", "--out", str(tmp_path / "out"),
                    "--work", str(tmp_path / "work")], log=lambda _: None)


def test_fp32_runs_report_float32_linear_layers(tmp_path):
    """The default precision is fp32, and the dtype watch says so (mmm side; the bf16 test covers both sides)."""
    size = bench.SIZES["micro"]
    tok_dir = tmp_path / "tok"
    cfg = bench.load_size_config(size, tmp_path / "cfg", 1)
    tok = bench.train_tokenizer(cfg, tok_dir)
    shape = bench.model_shape(cfg, tok.vocab_size)
    assert bench.run_mmm(size, tmp_path / "work", 1, tok_dir, shape, "t")["linear_dtype"] == "float32"
