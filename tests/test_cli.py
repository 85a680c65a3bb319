"""The `mmm` command: sub-commands work on real inputs and bad input gives a named, non-traceback error."""
import json

import pytest
import yaml

from conftest import REPO, TINY_OVERRIDES
from mmm.cli import main


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "attention backend: flex, math, sdpa, xformers" in out and "dataset: audio, dna, image, image_text, text" in out
    maskers = next(line for line in out.splitlines() if line.startswith("masker: "))
    assert {"bert_random", "whole_word", "mae_random", "beit_block", "dna_span", "time_span"} <= set(maskers[8:].split(", "))
    modalities = next(line for line in out.splitlines() if line.startswith("modality: "))
    assert {"text", "image", "dna", "audio", "regions", "image_text"} <= set(modalities[10:].split(", "))
    objectives = next(line for line in out.splitlines() if line.startswith("objective: "))
    assert {"mlm", "mae", "mrfr", "mrc", "mrc_kl", "itm", "itc"} <= set(objectives[11:].split(", "))


def test_print_config_is_commented_yaml_with_overrides(capsys):
    assert main(["pretrain", "--config", str(REPO / "configs/text_mlm_tiny.yaml"), "--trainer.max_steps", "7",
                 "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "# optimizer steps to train" in out
    assert yaml.safe_load(out)["trainer"]["max_steps"] == 7


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--config", "configs/nope.yaml"], "config file not found"),
    (["pretrain", "--config", str(REPO / "configs"), "--print_config"], "configs is a folder; give a YAML file"),
    (["finetune", "src", "--train", "a.csv", "--dev", "b.csv", "--quick"], "--quick makes an embedded --task small"),
    (["pretrain", "--config", str(REPO / "configs/text_mlm_tiny.yaml"), "--model.encoder.width", "3"],
     "unknown override --model.encoder.width"),
    (["pretrain", "--masking.name", "random_bert", "--print_config"], None),
    (["shards", "build", "/definitely/missing", "/tmp/out"], "/definitely/missing"),
])
def test_bad_input_exits_2_with_a_named_error(argv, message, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    if message is None:  # print_config does not build parts; a bad masker name is caught when building
        assert code == 0
        return
    assert code == 2 and message in err and "Traceback" not in err


def test_unknown_masker_is_reported_when_the_run_is_built(tmp_path, capsys):
    argv = ["pretrain", "--config", str(REPO / "configs/text_mlm_tiny.yaml"), "--masking.name", "random_bert",
            "--trainer.default_root_dir", str(tmp_path)]
    for k, v in TINY_OVERRIDES.items():
        argv += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    assert main(argv) == 2
    assert "unknown masker 'random_bert'; known maskers: beit_block, bert_random," in capsys.readouterr().err


def test_shards_build_then_pretrain_on_them(tmp_path, capsys):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("Masked language models read text with holes. " * 40, encoding="utf-8")
    (src / "b.jsonl").write_text("\n".join(json.dumps({"text": f"document number {i} about encoders."}) for i in range(30)),
                                 encoding="utf-8")
    (src / "empty.txt").write_text("", encoding="utf-8")
    shards = tmp_path / "shards"
    assert main(["shards", "build", str(src), str(shards)]) == 2  # the empty file is an error by default...
    assert "empty.txt" in capsys.readouterr().err
    assert main(["shards", "build", str(src), str(shards), "--skip_bad", "--val_fraction", "0.2", "--max_chars", "300"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad input" in out  # ...and reported when skipping
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 1

    argv = ["pretrain", "--config", str(REPO / "configs/text_mlm_tiny.yaml"), "--data.train", str(shards),
            "--data.val", str(shards), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "run")]
    for k, v in {**TINY_OVERRIDES, "model.text.vocab_size": 120}.items():
        argv += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    assert main(argv) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_export_hf_from_the_cli(ckpt, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["export", "hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()


def test_demo_smoke(tmp_path, capsys):
    """The text part end to end with a handful of steps (the full demo is the slow test below)."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--parts", "text", "--max_steps", "3", "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "held-out masked-token accuracy" in out
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| **trained** |" in report and (tmp_path / "demo" / "text" / "loss_curve.png").stat().st_size > 1000
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())["parts"]["text"]
    counts = {k: v["predictions"] for k, v in m["held_out"].items()}
    assert set(counts) == {"trained", "untrained", "unigram"} and len(set(counts.values())) == 1
    assert counts["trained"] > 100


@pytest.mark.slow
def test_full_demo_beats_the_untrained_model(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no_progress"]) == 0
    parts = json.loads((tmp_path / "demo" / "metrics.json").read_text())["parts"]
    m = parts["text"]
    tr, un, uni = m["held_out"]["trained"], m["held_out"]["untrained"], m["held_out"]["unigram"]
    assert tr["accuracy"] > un["accuracy"] + 0.08 and tr["perplexity"] < un["perplexity"] / 10
    assert tr["accuracy"] > 1.5 * uni["accuracy"] and tr["perplexity"] < 0.75 * uni["perplexity"]  # context is used
    for part, metrics in parts.items():  # every other part's probe beats the same network at random init
        if "linear_probe" in metrics:
            probe = metrics["linear_probe"]
            assert probe["trained"]["accuracy"] > probe["untrained"]["accuracy"], part


def test_image_demo_smoke(tmp_path, capsys):
    """The image part end to end: MAE loss, probes, reconstruction figure (few steps, small probe)."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--parts", "image", "--max_steps", "3", "--quick",
                 "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "image: linear-probe accuracy trained" in out
    assert (tmp_path / "demo" / "image" / "reconstruction.png").stat().st_size > 5000
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())["parts"]["image"]
    assert m["held_out_loss"]["trained"]["mae"] > 0 and m["linear_probe"]["trained"]["test_samples"] > 50
    assert "## Image: masked autoencoder (MAE)" in (tmp_path / "demo" / "report.md").read_text()


def test_shards_build_for_images_and_dna(tmp_path, capsys):
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 16), (40 * i, 80, 120)).save(tmp_path / "img" / label / f"{i}.png")
    assert main(["shards", "build", str(tmp_path / "img"), str(tmp_path / "img_shards"), "--dataset", "image",
                 "--labels", "folders"]) == 0
    assert "train: 6 samples" in capsys.readouterr().out
    assert main(["shards", "check", str(tmp_path / "img_shards"), "--dataset", "image"]) == 0
    (tmp_path / "genome.fa").write_text(">chr1\n" + "ACGT" * 100 + "\n>chr2\n" + "GGCA" * 60 + "\n")
    assert main(["shards", "build", str(tmp_path / "genome.fa"), str(tmp_path / "dna_shards"), "--dataset", "dna",
                 "--window", "100"]) == 0
    assert "train: 7 samples" in capsys.readouterr().out  # 4 windows of chr1 + 3 (the last end-aligned) of chr2
    assert main(["shards", "build", str(tmp_path / "genome.fa"), str(tmp_path / "x"), "--dataset", "dna",
                 "--max_chars", "10"]) == 2
    assert "--max_chars" in capsys.readouterr().err


def test_prepare_fits_audio_codebooks_offline_and_pretrain_reuses_them(tmp_path, capsys):
    run_dir = tmp_path / "audio_run"
    over = ["--trainer.default_root_dir", str(run_dir), "--model.audio.stats_clips", "30",
            "--model.audio.target_clips", "30", "--model.audio.target_clusters", "8",
            "--model.encoder.dim", "32", "--model.encoder.depth", "1", "--model.encoder.heads", "2",
            "--model.encoder.mlp_hidden", "64", "--objectives.0.args", "{target: audio_mfcc, num_classes: 8}"]
    assert main(["prepare", "--config", str(REPO / "configs/audio_mam_tiny.yaml"), *over]) == 0
    out = capsys.readouterr().out
    assert "audio: audio_frontend.json, kmeans_mfcc.json" in out
    codebook = run_dir / "audio" / "kmeans_mfcc.json"
    before = codebook.read_text()
    stamp = codebook.stat().st_mtime_ns
    assert main(["pretrain", "--config", str(REPO / "configs/audio_mam_tiny.yaml"), *over, "--trainer.max_steps", "2",
                 "--data.val", "null", "--data.num_workers", "0", "--data.batch_size", "4",
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert codebook.read_text() == before and codebook.stat().st_mtime_ns == stamp  # reused, not refitted


def test_vl_demo_smoke(tmp_path, capsys):
    """The vision-language part end to end: a few steps of every task, retrieval and ITM scores, the report."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--parts", "vl", "--max_steps", "6", "--quick",
                 "--no_progress"]) == 0
    assert "vl: text->image R@1 trained" in capsys.readouterr().out
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())["parts"]["vl"]
    for name in ("trained", "untrained"):
        s = m["scores"][name]
        assert s["retrieval"]["texts"] > 0 and 0.0 <= s["itm_accuracy"] <= 1.0
        assert set(s["retrieval"]["t2i"]) == {"1", "5", "10"}
    assert (tmp_path / "demo" / "vl" / "loss_curve.png").stat().st_size > 5000
    assert "## Vision-language" in (tmp_path / "demo" / "report.md").read_text()
