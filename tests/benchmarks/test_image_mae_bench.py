"""The MAE training-step benchmark runs end to end on a micro config and reports what it promises."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from benchmarks import image_mae_step as bench  # noqa: E402

MICRO = ["--config", "small", "--image-size", "16", "--patch-size", "4", "--dim", "32", "--depth", "1",
         "--heads", "2", "--mlp-hidden", "64", "--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2",
         "--batch", "4", "--steps", "2", "--warmup", "1", "--threads", "1"]


def _cfg(**kw):
    base = dict(image_size=16, patch_size=4, dim=32, depth=2, heads=2, mlp_hidden=64, decoder_dim=16,
                decoder_depth=1, decoder_heads=2, batch=3)
    return bench.BenchConfig("t", **{**base, **kw})


def test_micro_run_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    report = bench.main(MICRO + ["--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(report["results"]))
    assert set(data["env"]) >= {"device", "threads", "torch", "transformers"}
    (r,) = data["results"]
    assert r["config"]["dim"] == 32 and r["config"]["image_size"] == 16 and r["images"] == 4
    assert r["patches_per_image"] == 16 and r["visible_per_image"] == 4
    for name in bench.CONTENDERS:
        e = r[name]
        assert len(e["step_times_s"]) == 2 and e["median_step_s"] > 0 and e["images_per_s"] > 0
        assert math.isfinite(e["final_loss"]) and e["train_gflop_per_image"] > 0
    # the encoders really see [CLS] + 25% of the patches in MAE mode, every patch in mask-token mode
    assert r["mmm_drop"]["encoder_tokens"] == 4 * (1 + 4)
    assert r["mmm_drop"]["encoder_patch_fraction"] == pytest.approx(0.25)
    assert r["hf"]["encoder_patch_fraction"] == pytest.approx(0.25)
    assert r["mmm_mask_token"]["encoder_tokens"] == 4 * (1 + 16)
    assert r["mmm_mask_token"]["encoder_patch_fraction"] == pytest.approx(1.0)
    assert r["flop_ratio_mask_token_vs_drop"] > 1
    for key in ("speedup_drop_vs_mask_token", "speedup_drop_vs_mask_token_paired", "speedup_mmm_vs_hf",
                "speedup_mmm_vs_hf_paired"):
        assert r[key] > 0
    assert r["speedup_mmm_vs_hf"] == pytest.approx(r["mmm_drop"]["images_per_s"] / r["hf"]["images_per_s"])
    assert r["targets"] == bench.TARGETS
    p = r["parity"]
    assert p["same_weights"]["abs_loss_diff"] < 1e-5 and p["same_weights"]["hf_hid_same_patches"]
    assert p["params"]["hf_trainable"] == p["params"]["mmm"] - p["params"]["mmm_unused_in_drop_mode"]
    table = md.read_text()
    assert "| mmm MAE (drop masked) |" in table and "ViTMAEForPreTraining" in table
    assert "| mmm mask-token encoder |" in table


def test_packed_batches_hold_a_quarter_of_the_patches():
    cfg = _cfg(image_size=32, batch=5)  # 64 patches, 16 visible
    b = bench.make_batches(cfg, seed=1)
    assert b.mask.shape == (5, 64) and (b.mask.sum(1) == 48).all()
    assert b.drop.num_tokens == 5 * (1 + 16) and b.drop.inputs["image"].drop_masked
    assert b.mask_token.num_tokens == 5 * (1 + 64) and not b.mask_token.inputs["image"].drop_masked
    model = bench.build_mmm(cfg)
    assert bench.count_encoder_tokens("mmm_drop", model, b) == b.drop.num_tokens
    assert bench.count_encoder_tokens("mmm_mask_token", model, b) == b.mask_token.num_tokens


def test_weight_copy_and_noise_give_hf_the_same_loss():
    cfg = _cfg()
    b = bench.make_batches(cfg, seed=2)
    check = bench.parity(cfg, b, seed=3)
    assert check["same_weights"]["hf_hid_same_patches"]
    assert check["same_weights"]["abs_loss_diff"] < 1e-5
    assert 0.1 < check["init"]["mmm_loss"] < 10 and 0.1 < check["init"]["hf_loss"] < 10
