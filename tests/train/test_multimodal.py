"""configs/multimodal_tiny.yaml: text, images, audio, DNA and image-text pairs train one shared encoder,
and each modality's encoder loads from the checkpoint on its own and computes what the model computes."""
import numpy as np
import torch

from conftest import REPO
from mmm.batch import FeatureInput, ImageInput, PackedBatch
from mmm.config import load_config
from mmm.core.packing import PackedSeqInfo
from mmm.encoders import load_encoder
from mmm.train.pretrain import pretrain

TINY = {
    "model.encoder.dim": 32, "model.encoder.depth": 1, "model.encoder.heads": 2, "model.encoder.mlp_hidden": 64,
    "model.text.vocab_size": 400, "model.text.tokenizer_train_docs": 200, "model.text.max_len": 48,
    "model.audio.stats_clips": 40, "model.audio.target_clips": 40, "model.audio.target_clusters": 8,
    "data.batch_size": 4, "data.shuffle_buffer": 0, "trainer.max_steps": 14, "trainer.val_check_interval": 1000,
    "trainer.limit_val_batches": 1, "trainer.enable_progress_bar": False, "optim.warmup_steps": 2,
}


def test_all_modalities_train_one_encoder_and_each_encoder_loads_alone(tmp_path):
    over = dict(TINY, **{"trainer.default_root_dir": str(tmp_path / "run")})
    cfg = load_config(REPO / "configs" / "multimodal_tiny.yaml", over)
    cfg.objectives[2].args["num_classes"] = 8  # the HuBERT head: one class per (shrunk) codebook entry
    run = pretrain(cfg)
    model = run.module.model.eval()
    assert list(model.embedders) == ["text", "image", "audio", "dna"]
    tasks = {name for name, c in run.datamodule.source_counts().items() if c["batches"]}
    assert len(tasks) >= 5, tasks  # 14 steps over 7 weighted tasks

    with torch.no_grad():
        model.modality_embed.weight.normal_(0, 0.5)  # make the folded modality vectors matter
    run.trainer.save_checkpoint(str(run.last_checkpoint))
    for modality in ("text", "image", "audio", "dna"):
        assert load_encoder(run.last_checkpoint, modality=modality) is not None

    image_enc = load_encoder(run.last_checkpoint, modality="image")
    pixels = torch.randn(2, 3, 32, 32)
    n = image_enc.embedder.num_prefix_tokens + image_enc.embedder.num_patches
    seq = PackedSeqInfo.from_seqlens([n, n])
    with torch.no_grad():
        ref = model.encode(PackedBatch(seq, {"image": ImageInput(pixels)}))  # (2n, d)
        out = image_enc(pixels)  # (2, n, d)
    assert torch.allclose(out.reshape(2 * n, -1), ref, atol=1e-5)
    from mmm.interop.timm import to_timm_model

    with torch.no_grad():  # and it exports to timm unchanged (the modality vector is folded in)
        assert torch.allclose(to_timm_model(image_enc).eval().forward_features(pixels), out, atol=1e-5)

    audio_enc = load_encoder(run.last_checkpoint, modality="audio")
    feats = torch.randn(7, audio_enc.embedder.feature_dim)
    seq = PackedSeqInfo.from_seqlens([7])
    with torch.no_grad():
        ref = model.encode(PackedBatch(seq, {"audio": FeatureInput(feats, seq.position_ids)}))
        out = audio_enc(feats[None])[0]
    assert torch.allclose(out, ref, atol=1e-5)
    wave = np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)).astype(np.float32)
    assert audio_enc.encode_waveform(wave, 16000).shape[-1] == 32
