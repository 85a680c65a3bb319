"""``mmm finetune`` and ``mmm embed`` end to end for image, DNA and audio encoders on labelled data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmm.cli import main
from tests.downstream.helpers import check_cls_last_block, shape_images, write_table


def test_image_finetune_and_embed_on_labelled_shards(image_ckpt: Path, tmp_path: Path, capsys) -> None:
    shards = tmp_path / "shards"
    assert main(["shards", "build", str(shape_images(tmp_path / "imgs", 16)), str(shards), "--dataset", "image",
                 "--labels", "folders", "--val_fraction", "0.3"]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", str(image_ckpt), "--modality", "image", "--data", str(shards), "--seeds", "2",
                 "--epochs", "4", "--lr", "1e-3", "--batch_size", "8", "--pooling", "mean", "--out", str(out)]) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["labels"]["names"] == ["0", "1"] and res["data"]["sizes"]["train"] + res["data"]["sizes"]["dev"] == 32
    assert len(res["seeds"]) == 2 and 0.0 <= res["dev"]["mean"] <= 1.0
    assert (out / "seed0" / "model.safetensors").is_file() and (out / "seed0" / "head.safetensors").is_file()
    emb = tmp_path / "emb"
    assert main(["embed", str(image_ckpt), str(shards), str(emb), "--modality", "image", "--split", "val",
                 "--pooling", "cls"]) == 0
    feats, labels = np.load(emb / "features.npy"), np.load(emb / "labels.npy")
    assert feats.shape == (res["data"]["sizes"]["dev"], 32) and set(labels.tolist()) <= {0, 1}
    # shards are held encoded (RawSample) and decoded when embedded: the features of the decoded split
    from mmm.downstream.data import read_shards
    from mmm.downstream.inputs import RawSample, load_adapter as _load

    kept = read_shards(shards, "image", "val", labelled=False, keep_encoded=True)
    assert all(isinstance(x, RawSample) for x in kept.inputs)
    decoded = read_shards(shards, "image", "val", labelled=False)
    np.testing.assert_allclose(feats, _load(str(image_ckpt), "image").features(decoded.inputs, "cls"), atol=1e-5)
    # a raw image folder embeds too, keyed by relative path
    assert main(["embed", str(image_ckpt), str(tmp_path / "imgs" / "disk"), str(tmp_path / "e2"), "--modality",
                 "image"]) == 0
    keys = (tmp_path / "e2" / "keys.txt").read_text().splitlines()
    assert keys[0] == "0.png"
    # the folder is read as file references, decoded batch by batch (not held decoded), with the same features
    from PIL import Image

    from mmm.downstream.data import read_raw_inputs
    from mmm.downstream.inputs import RawFile, load_adapter

    read = read_raw_inputs(tmp_path / "imgs" / "disk", "image")
    assert all(isinstance(x, RawFile) for x in read.inputs) and read.where == keys
    decoded = [Image.open(tmp_path / "imgs" / "disk" / k).convert("RGB") for k in keys]
    np.testing.assert_allclose(np.load(tmp_path / "e2" / "features.npy"),
                               load_adapter(str(image_ckpt), "image").features(decoded, "mean"), atol=1e-5)
    # a text file is not an image task: the error names it
    capsys.readouterr()
    (tmp_path / "t.tsv").write_text("sentence\tlabel\na\t1\n")
    assert main(["finetune", str(image_ckpt), "--modality", "image", "--train", str(tmp_path / "t.tsv"),
                 "--dev", str(tmp_path / "t.tsv")]) == 2
    assert "reads labelled shards" in capsys.readouterr().err


def _dna_encoder(tmp_path: Path) -> Path:
    import torch

    from mmm.config import EncoderConfig, ModelConfig
    from mmm.encoders import TextEncoder, save_encoder
    from mmm.modalities.dna.tokenizer import DNACharTokenizer

    cfg = ModelConfig(encoder=EncoderConfig(dim=32, depth=1, heads=2, mlp_hidden=64))
    cfg.dna.max_len = 64
    tok = DNACharTokenizer()
    torch.manual_seed(0)
    enc = TextEncoder.from_config(cfg, tok.vocab_size, tok.pad_id, tok, modality="dna")
    return save_encoder(enc, tmp_path / "dna_enc")


def _dna_rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        seq = "".join(rng.choice(list("ACGT"), 40))
        if label:
            at = int(rng.integers(0, 30))
            seq = seq[:at] + "GGGGGGGGGG" + seq[at + 10:]
        rows.append((seq, label))
    return rows


def test_dna_finetune_from_sequence_label_csv_and_embed(tmp_path: Path, capsys) -> None:
    enc = _dna_encoder(tmp_path)
    train = write_table(tmp_path / "train.csv", ["sequence", "label"], _dna_rows(64, 0))
    dev = write_table(tmp_path / "dev.csv", ["sequence", "label"], _dna_rows(32, 1))
    out = tmp_path / "ft"
    assert main(["finetune", str(enc), "--modality", "dna", "--train", str(train), "--dev", str(dev), "--seeds", "2",
                 "--epochs", "8", "--lr", "2e-3", "--batch_size", "16", "--out", str(out)]) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["dev"]["mean"] > 0.8, res  # a run of 10 Gs is easy to spot
    assert main(["embed", str(enc), str(train), str(tmp_path / "e"), "--modality", "dna", "--text_column",
                 "sequence"]) == 0
    assert np.load(tmp_path / "e" / "features.npy").shape == (64, 32)
    assert main(["embed", str(enc), str(train), str(tmp_path / "e0"), "--modality", "dna"]) == 0  # as finetune: sequence
    np.testing.assert_array_equal(np.load(tmp_path / "e0" / "features.npy"), np.load(tmp_path / "e" / "features.npy"))
    fa = tmp_path / "x.fa"
    fa.write_text(">r1 first\nACGT\nACGT\n>r2\nGGGG\n")
    assert main(["embed", str(enc), str(fa), str(tmp_path / "f"), "--modality", "dna"]) == 0
    assert (tmp_path / "f" / "keys.txt").read_text().splitlines() == ["x.fa:r1", "x.fa:r2"]
    # bad bases name the row
    write_table(tmp_path / "bad.csv", ["sequence", "label"], [("ACGT", 0), ("ACXT", 1)])
    capsys.readouterr()
    assert main(["finetune", str(enc), "--modality", "dna", "--train", str(tmp_path / "bad.csv"), "--dev",
                 str(dev), "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:row 3" in err and "'X'" in err, err
    # --skip_bad skips them, counted, as the shard readers do (it stopped with the error); the same for embed
    train_bad = write_table(tmp_path / "train_bad.csv", ["sequence", "label"], _dna_rows(64, 0) + [("AC-GT", 1)])
    assert main(["finetune", str(enc), "--modality", "dna", "--train", str(train_bad), "--dev", str(dev),
                 "--seeds", "1", "--epochs", "1", "--skip_bad"]) == 0
    assert "skipped 1 bad row(s) (--skip_bad), e.g. " in capsys.readouterr().out
    gap = tmp_path / "gap.fa"
    gap.write_text(">r1\nACGT\n>r2\nAC-GT\n")
    assert main(["embed", str(enc), str(gap), str(tmp_path / "g"), "--modality", "dna", "--skip_bad"]) == 0
    assert "skipped 1 bad input(s)" in capsys.readouterr().out
    assert (tmp_path / "g" / "keys.txt").read_text().splitlines() == ["gap.fa:r1"]
    # an input longer than the encoder is cut for fine-tuning, and the command says so
    long_dev = write_table(tmp_path / "long.csv", ["sequence", "label"], [(row[0] * 40, row[1]) for row in _dna_rows(8, 2)])
    assert main(["finetune", str(enc), "--modality", "dna", "--train", str(train), "--dev", str(long_dev),
                 "--seeds", "1", "--epochs", "1"]) == 0
    assert "8 of 72 input(s) were cut to the encoder's length" in capsys.readouterr().out


def _audio_encoder(tmp_path: Path, waves) -> Path:
    import torch

    from mmm.config import EncoderConfig
    from mmm.encoders import save_encoder
    from mmm.modalities.audio.embedder import AudioEncoder, AudioEncoderConfig
    from mmm.modalities.audio.frontend import AudioFrontend, AudioFrontendConfig

    front = AudioFrontend(AudioFrontendConfig(sample_rate=8000, n_mels=16, max_seconds=None)).fit_stats(waves)
    torch.manual_seed(0)
    enc = AudioEncoder.from_config(AudioEncoderConfig(encoder=EncoderConfig(dim=32, depth=1, heads=2, mlp_hidden=64),
                                                      feature_dim=front.token_dim, max_len=8), front)
    return save_encoder(enc, tmp_path / "audio_enc")


def test_audio_finetune_on_labelled_shards(tmp_path: Path) -> None:
    import soundfile as sf

    sr = 8000
    t = np.arange(int(0.5 * sr)) / sr
    rng = np.random.default_rng(0)
    waves = []
    for cls, f0 in (("low", 300.0), ("high", 2000.0)):
        (tmp_path / "wav" / cls).mkdir(parents=True)
        for i in range(10):
            w = (0.5 * np.sin(2 * np.pi * f0 * (1 + 0.05 * rng.random()) * t) + 0.01 * rng.normal(size=t.size))
            sf.write(tmp_path / "wav" / cls / f"{i}.wav", w.astype(np.float32), sr)
            waves.append((w.astype(np.float32), sr))
    enc = _audio_encoder(tmp_path, waves)
    shards = tmp_path / "shards"
    assert main(["shards", "build", str(tmp_path / "wav"), str(shards), "--dataset", "audio", "--labels", "folders",
                 "--sample_rate", str(sr), "--val_fraction", "0.3"]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", str(enc), "--modality", "audio", "--data", str(shards), "--seeds", "1", "--epochs", "3",
                 "--lr", "1e-3", "--batch_size", "4", "--out", str(out)]) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["config"]["pooling"] == "mean" and res["data"]["truncated_inputs"] == 0  # split, pooled whole
    assert 0.0 <= res["dev"]["mean"] <= 1.0
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        from mmm.downstream.inputs import load_adapter

        load_adapter(str(enc), "audio").check_pooling("cls")


def test_a_long_audio_clip_is_pooled_over_all_of_its_sequences(tmp_path: Path) -> None:
    """An audio input longer than the encoder kept only its first sequence (the first max_len tokens) in
    ``mmm embed`` and fine-tuning; it is split as pretraining splits it, and mean pooling covers every token."""
    import torch

    from mmm.downstream.inputs import load_adapter
    from mmm.modalities.audio.downstream import AudioChunks

    sr, t = 8000, np.arange(int(1.5 * 8000)) / 8000
    clip = (0.5 * np.sin(2 * np.pi * (300 + 400 * t) * t)).astype(np.float32)  # a chirp: its parts differ
    adapter = load_adapter(str(_audio_encoder(tmp_path, [(clip, sr)])), "audio")
    chunks = adapter.prepare((clip, sr), "chirp.wav")
    assert isinstance(chunks, AudioChunks) and len(chunks) >= 3 and adapter.truncated == 0
    with torch.no_grad():
        pooled = adapter.pooled([chunks, AudioChunks(chunks[:1])], "mean")
        tokens = torch.cat([adapter.forward([c])[0][0] for c in chunks])  # every token of the clip, one at a time
        first = adapter.forward([chunks[0]])[0][0].mean(0)
    torch.testing.assert_close(pooled[0], tokens.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled[1], first, rtol=1e-4, atol=1e-5)  # a one-sequence clip: as before


def test_embed_names_an_audio_file_the_front_end_refuses_and_skips_it_with_skip_bad(tmp_path: Path, capsys) -> None:
    """A file at a rate the front end refuses (384 kHz against 8 kHz) was a bare message without its name, and
    ``--skip_bad`` did not skip it: the check runs after the files are read, where skip_bad applied."""
    import soundfile as sf

    sr, t = 8000, np.arange(4000) / 8000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    enc = _audio_encoder(tmp_path, [(tone, sr)])
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "good.wav", tone, sr)
    sf.write(tmp_path / "clips" / "ultra.wav", np.zeros(384000 // 4, np.float32), 384000)
    assert main(["embed", str(enc), str(tmp_path / "clips"), str(tmp_path / "e"), "--modality", "audio"]) == 2
    err = capsys.readouterr().err
    assert "ultra.wav" in err and "384000 Hz" in err, err
    assert main(["embed", str(enc), str(tmp_path / "clips"), str(tmp_path / "e"), "--modality", "audio",
                 "--skip_bad"]) == 0
    assert "skipped 1 bad input(s)" in capsys.readouterr().out
    assert [Path(k).name for k in (tmp_path / "e" / "keys.txt").read_text().splitlines()] == ["good.wav"]
    assert np.load(tmp_path / "e" / "features.npy").shape[0] == 1
    info = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert info["skipped"] == 1 and "ultra.wav" in info["skipped_examples"][0][0]
    # the folder's files are decoded when embedded, batch by batch: the same features as the decoded waveform
    from mmm.downstream.inputs import load_adapter

    pcm, rate = sf.read(tmp_path / "clips" / "good.wav", dtype="float32", always_2d=True)  # the 16-bit file's samples
    want = load_adapter(str(enc), "audio").features([(pcm.T, rate)], "mean")
    np.testing.assert_allclose(np.load(tmp_path / "e" / "features.npy"), want, atol=1e-5)


def test_image_cls_pooling_runs_the_last_block_for_cls_alone_with_the_same_logits_and_gradients(image_ckpt: Path):
    """Image fine-tuning on [CLS] takes the final-layer subset too: the same logits and every gradient."""
    import torch

    from mmm.downstream.finetune import ClassificationHead, FinetuneModel
    from mmm.downstream.inputs import load_adapter

    adapter = load_adapter(str(image_ckpt), "image")
    enc = adapter.encoder
    size = enc.embedder.image_size
    torch.manual_seed(0)
    items = [torch.randn(3, size, size) for _ in range(5)]  # normalised pixels, as prepare() makes them
    model = FinetuneModel(adapter, ClassificationHead(adapter.hidden_size, 3, 0.0), "cls").train()
    rows_seen = check_cls_last_block(model, enc.encoder.blocks[-1].mlp, items)
    tokens = enc.embedder.num_prefix_tokens + enc.embedder.num_patches
    assert rows_seen == [5, 5 * tokens]
