"""Tests for the audio modality: embedder (mask-token mode), assets, maskers, and a short pretrain whose
checkpoint rebuilds an AudioEncoder with the trained model's features."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import mmm.objectives.feature_regression  # noqa: F401  (registers "masked_features")
from datasets_def.audio import build_shards, iter_clips
from mmm.config import ComponentConfig, EncoderConfig, ModelConfig, load_config
from mmm.modalities.audio.pipeline import single_thread
from mmm.data.stream import SampleErrorHandler, list_shards, make_pipeline
from mmm.modalities.audio.masking import SpecPatchMasker, TimeSpanMasker
from mmm.modalities.audio.embedder import AudioEmbedder, AudioEncoder, AudioEncoderConfig
from mmm.modalities.audio.frontend import FRONTEND_FILE, AudioFrontend
from mmm.modalities.audio.modality import AudioModality, audio_encoder_config, codebook_file
from mmm.registry import EMBEDDERS, MODALITIES

SR = 16000
REPO = Path(__file__).resolve().parents[2]
TINY_AUDIO = {"n_mels": 16, "frames_per_token": 4, "max_seconds": 1.0, "max_tokens": 32, "stats_clips": 10,
              "target_clusters": 4, "target_clips": 10, "targets": ["mfcc"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Four labelled clips (two classes), one of them 1.5 s (split into two sequences of <= 1 s)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("shards")
    t = lambda s: np.arange(int(s * SR)) / SR  # noqa: E731
    clips = {"tone/a.wav": np.sin(2 * np.pi * 300 * t(0.5)), "tone/b.wav": np.sin(2 * np.pi * 500 * t(1.5)),
             "noise/c.wav": np.random.default_rng(0).standard_normal(int(0.6 * SR)) / 3,
             "noise/d.wav": np.random.default_rng(1).standard_normal(int(0.4 * SR)) / 3}
    for name, wav in clips.items():
        (src / name).parent.mkdir(exist_ok=True)
        sf.write(str(src / name), (0.3 * wav).astype(np.float32), SR, subtype="PCM_16")
    build_shards(src, out, labels="folders")
    return out


def tiny_model_cfg(**audio) -> ModelConfig:
    cfg = ModelConfig()
    for k, v in {**TINY_AUDIO, **audio}.items():
        setattr(cfg.audio, k, v)
    return cfg


# ----------------------------------------------------------------------------- embedder


def test_embedder_replaces_hidden_tokens_by_the_mask_embedding_and_keeps_its_input() -> None:
    assert EMBEDDERS.get("audio") is AudioEmbedder and MODALITIES.get("audio") is AudioModality
    emb = AudioEmbedder(feature_dim=6, dim=8, max_len=10, position="none", embed_norm=False, dropout=0.0)
    x = torch.randn(5, 6)
    before = x.clone()
    mask = torch.tensor([False, True, False, True, False])
    out = emb(x, torch.arange(5), mask)
    assert out.shape == (5, 8) and torch.equal(x, before)  # input untouched (regression targets)
    torch.testing.assert_close(out[mask], emb.mask_embedding.expand(2, 8))
    torch.testing.assert_close(out[~mask], emb.proj(emb.feature_norm(x[~mask])))
    out.sum().backward()
    assert emb.mask_embedding.grad is not None and emb.mask_embedding.grad.abs().sum() > 0


def test_embedder_adds_positions_and_norm() -> None:
    emb = AudioEmbedder(feature_dim=4, dim=8, max_len=3, position="learned", embed_norm=True, dropout=0.0)
    with torch.no_grad():
        emb.positions.weight.normal_()
    x = torch.randn(1, 4)
    a, b = emb(torch.cat([x, x]), torch.tensor([0, 2]))
    assert not torch.allclose(a, b)  # same features, different positions
    assert torch.allclose(a.mean(), torch.tensor(0.0), atol=1e-5)  # LayerNorm on the sum
    with pytest.raises(ValueError, match=r"features must be \(N, 4\)"):
        emb(torch.randn(2, 5), torch.tensor([0, 1]))


def test_padded_encoder_matches_per_clip_encoding() -> None:
    cfg = AudioEncoderConfig(encoder=EncoderConfig(dim=16, depth=1, heads=2, mlp_hidden=32, dropout=0.0,
                                                   attn_dropout=0.0), feature_dim=6, max_len=8)
    enc = AudioEncoder.from_config(cfg).eval()
    feats = torch.randn(2, 5, 6)
    with torch.no_grad():
        out = enc(feats, lengths=torch.tensor([5, 3]))
        alone = enc(feats[1:, :3])
        masked = enc(feats, attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]))
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out[1, :3], alone[0], atol=1e-5, rtol=0)
    assert torch.equal(out[1, 3:], torch.zeros(2, 16)) and torch.equal(masked, out)
    with pytest.raises(ValueError, match="position table"):
        enc(torch.randn(1, 9, 6))
    with pytest.raises(RuntimeError, match="front end"):
        enc.encode_waveform(np.zeros(1600, dtype=np.float32), SR)


def _fitted_encoder(token: str = "time") -> AudioEncoder:
    """A random-init encoder with a front end fitted on two synthetic clips."""
    cfg = tiny_model_cfg(token=token, patch_freq=8, patch_time=2)
    frontend = AudioModality(cfg).frontend_config
    t = np.arange(SR) / SR
    clips = [(np.sin(2 * np.pi * 440 * t).astype(np.float32), SR),
             (np.random.default_rng(0).standard_normal(SR // 2).astype(np.float32) / 3, SR)]
    cfg.encoder = EncoderConfig(dim=16, depth=1, heads=2, mlp_hidden=32, dropout=0.0, attn_dropout=0.0)
    return AudioEncoder.from_config(audio_encoder_config(cfg), AudioFrontend(frontend).fit_stats(clips)).eval()


@pytest.mark.parametrize("token", ["time", "patch"])
def test_save_encoder_round_trip_gives_identical_outputs_on_a_waveform(tmp_path, token) -> None:
    from mmm.encoders import load_encoder, save_encoder

    enc = _fitted_encoder(token)
    out = save_encoder(enc, tmp_path / "audio_enc")
    assert {p.name for p in out.iterdir()} == {"mmm_encoder.json", "model.safetensors", FRONTEND_FILE}
    back = load_encoder(out, modality="audio")
    assert isinstance(back, AudioEncoder) and not back.training and back.config == enc.config
    assert back.frontend.config == enc.frontend.config
    np.testing.assert_array_equal(back.frontend.mean, enc.frontend.mean)
    np.testing.assert_array_equal(back.frontend.std, enc.frontend.std)
    for k, v in enc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    wav = 0.3 * np.sin(2 * np.pi * 330 * np.arange(int(1.3 * 22050)) / 22050)  # another rate, > max_seconds
    stereo = np.stack([wav, 0.5 * wav]).astype(np.float32)
    assert torch.equal(back.encode_waveform(stereo, 22050), enc.encode_waveform(stereo, 22050))
    with pytest.raises(ValueError, match="holds a 'audio' encoder, but modality='text'"):
        load_encoder(out)


def test_save_encoder_without_front_end_and_bad_folders(tmp_path) -> None:
    from mmm.encoders import load_encoder, save_encoder

    enc = _fitted_encoder()
    bare = AudioEncoder(enc.embedder, enc.encoder, enc.config)  # features in, no waveform path
    out = save_encoder(bare, tmp_path / "bare")
    assert not (out / FRONTEND_FILE).exists()
    back = load_encoder(out, modality="audio")
    assert back.frontend is None
    feats = torch.randn(2, 5, enc.embedder.feature_dim)
    with torch.no_grad():
        assert torch.equal(back(feats, lengths=torch.tensor([5, 2])), enc(feats, lengths=torch.tensor([5, 2])))

    full = save_encoder(enc, tmp_path / "full")
    (full / FRONTEND_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="names the audio front end"):
        load_encoder(full, modality="audio")
    with pytest.raises(ValueError, match="no normalisation statistics"):
        save_encoder(AudioEncoder(enc.embedder, enc.encoder, enc.config, AudioFrontend(enc.frontend.config)),
                     tmp_path / "unfitted")


@pytest.mark.parametrize("embed_norm", [True, False])
def test_embed_norm_comes_from_model_audio(embed_norm) -> None:
    cfg = tiny_model_cfg(embed_norm=embed_norm)
    emb = AudioModality(cfg).build_embedder(cfg.encoder)
    assert (emb.norm is not None) is embed_norm
    enc = AudioEncoder.from_config(audio_encoder_config(cfg))
    assert enc.config.embed_norm is embed_norm
    # the standalone encoder has exactly the trained embedder's weights, so checkpoints load strictly
    assert set(enc.embedder.state_dict()) == set(emb.state_dict())
    assert any(k.startswith("norm.") for k in emb.state_dict()) is embed_norm


# ----------------------------------------------------------------------------- modality


def test_build_masker_accepts_only_audio_maskers() -> None:
    m = AudioModality(tiny_model_cfg())
    assert isinstance(m.build_masker(ComponentConfig("time_span", {"p": 0.1, "span": 3})), TimeSpanMasker)
    assert isinstance(m.build_masker(ComponentConfig("spec_patch", {"ratio": 0.5})), SpecPatchMasker)
    with pytest.raises(ValueError, match="does not mask audio tokens; use one of"):
        m.build_masker(ComponentConfig("bert_random", {"ratio": 0.15}))
    with pytest.raises(ValueError, match="hides frequency rows"):
        m.build_masker(ComponentConfig("spec_patch", {"ratio": 0.5, "structure": "freq"}))
    with pytest.raises(ValueError, match="model.audio.targets"):
        AudioModality(tiny_model_cfg(targets=["pitch"]))
    with pytest.raises(RuntimeError, match="prepare"):
        m.stages(None, batch_size=2, seed=0, handler=SampleErrorHandler(), fixed_masking=True, epochs=None,
                 train=False)


def test_prepare_saves_reuses_and_round_trips_assets(shards, tmp_path, monkeypatch) -> None:
    urls = list_shards(shards, split="train")
    cfg = tiny_model_cfg(targets=["mfcc", "chroma"])
    m = AudioModality(cfg)
    m.prepare(urls, tmp_path)
    files = m.assets()
    assert set(files) == {FRONTEND_FILE, codebook_file("mfcc"), codebook_file("chroma")}
    assert all((tmp_path / "audio" / name).is_file() for name in files)
    assert m.codebooks["chroma"].k == 4 and m.frontend.fitted

    again = AudioModality(cfg)  # the saved assets are reused, nothing is refitted
    monkeypatch.setattr(AudioModality, "fit_frontend", lambda *a: pytest.fail("refitted the front end"))
    monkeypatch.setattr(AudioModality, "fit_codebooks", lambda *a: pytest.fail("refitted a codebook"))
    again.prepare(urls, tmp_path)
    assert again.assets() == files

    loaded = AudioModality(cfg)
    loaded.load_assets(json.loads(json.dumps(files)), "ckpt")
    np.testing.assert_array_equal(loaded.frontend.mean, m.frontend.mean)
    np.testing.assert_array_equal(loaded.codebooks["mfcc"].centroids, m.codebooks["mfcc"].centroids)
    with pytest.raises(ValueError, match="lacks"):
        loaded.load_assets({FRONTEND_FILE: files[FRONTEND_FILE]}, "ckpt")
    with pytest.raises(ValueError, match="does not match model.audio"):
        AudioModality(tiny_model_cfg(n_mels=32)).load_assets(files, "ckpt")
    with pytest.raises(ValueError, match="target_clusters"):
        AudioModality(tiny_model_cfg(target_clusters=5, targets=["mfcc", "chroma"])).load_assets(files, "ckpt")


def test_too_few_tokens_for_the_codebook_is_explained(shards, tmp_path) -> None:
    m = AudioModality(tiny_model_cfg(target_clusters=10_000))
    with pytest.raises(ValueError, match="lower target_clusters"):
        m.prepare(list_shards(shards, split="train"), tmp_path)


# ----------------------------------------------------------------------------- short pretrain


def test_short_pretrain_checkpoint_gives_the_trained_features(shards, tmp_path) -> None:
    from mmm.encoders import read_checkpoint
    from mmm.train.pretrain import pretrain

    overrides = {f"model.audio.{k}": v for k, v in TINY_AUDIO.items()}
    overrides.update({
        "model.encoder.dim": 32, "model.encoder.depth": 1, "model.encoder.heads": 2, "model.encoder.mlp_hidden": 64,
        "objectives": [{"name": "token_targets", "label": "hubert_mfcc", "args": {"target": "audio_mfcc",
                                                                                  "num_classes": 4}},
                       {"name": "masked_features", "weight": 0.1, "args": {"modality": "audio"}}],
        "masking.args": {"p": 0.2, "span": 3}, "data.train": str(shards), "data.val": None, "data.batch_size": 4,
        "data.num_workers": 0, "data.shuffle_buffer": 0, "trainer.max_steps": 10, "trainer.enable_progress_bar": False,
        "trainer.default_root_dir": str(tmp_path / "run"), "trainer.log_every_n_steps": 1,
    })
    run = pretrain(load_config(REPO / "configs" / "audio_mam_tiny.yaml", overrides))
    contents = read_checkpoint(run.last_checkpoint)
    assert set(contents.assets["audio"]) == {FRONTEND_FILE, codebook_file("mfcc")}
    enc = AudioModality.encoder_from_checkpoint(contents)
    assert isinstance(enc, AudioEncoder) and not enc.training
    assert torch.equal(enc.embedder.proj.weight, contents.state_dict["embedders.audio.proj.weight"])

    model = run.module.model.cpu().eval()
    stages = run.modality.stages(None, batch_size=4, seed=0, handler=SampleErrorHandler(), fixed_masking=True,
                                 epochs=None, train=False)
    batch = next(iter(make_pipeline(list_shards(shards, split="train"), stages=stages, shuffle_shards=False,
                                    shuffle_buffer=0)))
    with torch.no_grad(), single_thread():
        ref = batch.seq.pad(model.encode(batch))  # (B, T, d)
        feats = batch.seq.pad(batch.inputs["audio"].features)
        out = enc(feats, lengths=torch.tensor(batch.seq.seqlens))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        clip = next(c for c in iter_clips(shards, "train") if c.meta["source"] == "tone/b.wav")  # 1.5 s: 2 sequences
        tokens = torch.from_numpy(enc.frontend(clip.waveform, clip.sample_rate))
        hidden = enc.encode_waveform(clip.waveform, clip.sample_rate)
        assert hidden.shape == (len(tokens), 32) and len(tokens) > 26
        torch.testing.assert_close(hidden[:26], enc(tokens[None, :26])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden[26:], enc(tokens[None, 26:])[0], atol=1e-5, rtol=0)

    from mmm.encoders import load_encoder, save_encoder

    saved = load_encoder(save_encoder(enc, tmp_path / "saved"), modality="audio")  # trained weights + fitted stats
    with single_thread():
        assert torch.equal(saved.encode_waveform(clip.waveform, clip.sample_rate), hidden)


def test_patch_tokens_keep_their_time_frequency_position_whatever_the_clip_width_in_training_and_standalone() -> None:
    """AudioMAE patches come row-major; their position ids were the flat index, so the first patch of the
    second frequency row had id 5 in a 5-column clip and id 9 in a 9-column one."""
    from mmm.modalities.audio.pipeline import AudioSample, collate_audio

    rows, max_len, dim = 2, 32, 6
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((rows * cols, dim)).astype(np.float32) for cols in (5, 9)]
    batch = collate_audio([AudioSample(c, rows, {}, -1, f"k{i}") for i, c in enumerate(clips)], max_len=max_len)
    ids = batch.inputs["audio"].position_ids
    stride = max_len // rows
    nine, five = ids[:18].view(rows, 9), ids[18:].view(rows, 5)  # longest first
    assert torch.equal(nine, torch.arange(rows)[:, None] * stride + torch.arange(9))
    assert torch.equal(five, nine[:, :5])
    with pytest.raises(ValueError, match="need max_len"):
        collate_audio([AudioSample(clips[0], rows, {}, -1, "k")])

    # the standalone encoder gives each patch the id training gave it: the same outputs as the packed path
    config = AudioEncoderConfig(encoder=EncoderConfig(dim=8, depth=1, heads=2, mlp_hidden=16, dropout=0.0,
                                                      attn_dropout=0.0),
                                feature_dim=dim, max_len=max_len, grid_rows=rows)
    enc = AudioEncoder.from_config(config).eval()
    with torch.no_grad():
        packed = enc.encoder(enc.embedder(batch.inputs["audio"].features, ids), batch.seq)
        padded = torch.zeros(2, 18, dim)
        padded[0], padded[1, :10] = torch.from_numpy(clips[1]), torch.from_numpy(clips[0])
        out = enc(padded, lengths=torch.tensor([18, 10]))
    torch.testing.assert_close(out[0], packed[:18], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :10], packed[18:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"2 frequency rows of at most 16 time columns"):
        enc(torch.randn(1, 9, dim))


def test_a_patch_mode_run_hands_its_grid_to_the_standalone_encoder() -> None:
    assert audio_encoder_config(tiny_model_cfg(token="patch", patch_freq=8, patch_time=2)).grid_rows == 2
    assert audio_encoder_config(tiny_model_cfg()).grid_rows == 1


def test_asset_fitting_treats_a_clip_the_front_end_refuses_as_training_does(tmp_path):
    """A clip with an 800 Hz header decodes but the front end refuses it: training skips and counts it under
    data.skip_bad, while the asset fit stopped on it (the statistics fit saying the shards held no audio)."""
    import io
    import json
    import tarfile

    from datasets_def.audio import encode_flac
    from mmm.config import load_config
    from mmm.data.tar import ReadOptions
    from mmm.modalities.audio.frontend import AudioDecodeError
    from mmm.modalities.audio.modality import AudioModality

    shard = tmp_path / "train-000000.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(shard, "w") as tf:
        for i, sr in enumerate([16000, 16000, 800, 16000]):
            flac, _ = encode_flac((0.1 * rng.standard_normal((1, sr))).astype(np.float32), sr)
            meta = json.dumps({"source": f"c{i}", "start_s": 0, "end_s": 1.0, "sample_rate": sr}).encode()
            for ext, data in (("flac", flac), ("json", meta)):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    cfg = load_config(REPO / "configs" / "audio_mam_tiny.yaml")
    cfg.model.audio.stats_clips, cfg.model.audio.target_clips, cfg.model.audio.target_clusters = 10, 10, 4
    audio = AudioModality(cfg.model)
    with pytest.raises(AudioDecodeError, match=r"train-000000.tar:000002: AudioFrontend: sample rate 800 Hz"):
        audio.fit_frontend([str(shard)])
    assert audio.fit_frontend([str(shard)], ReadOptions(skip_bad=True)).fitted
    first_bad = tmp_path / "first_bad.tar"  # the bad clip first: still named, not "no training audio"
    with tarfile.open(shard) as tin, tarfile.open(first_bad, "w") as tout:
        members = tin.getmembers()
        for m in sorted(members, key=lambda m: (not m.name.startswith("000002"), m.name)):
            tout.addfile(m, tin.extractfile(m))
    with pytest.raises(AudioDecodeError, match=r"first_bad.tar:000002: AudioFrontend: sample rate 800 Hz"):
        audio.fit_frontend([str(first_bad)])
    assert audio.fit_codebooks([str(shard)], ["mfcc"], ReadOptions(skip_bad=True))["mfcc"].k == 4
