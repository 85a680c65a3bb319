"""The enhanced MLM decoder (DrBERT): extra blocks between the encoder and the MLM head, in
pretraining only. They change the predictions and train, and neither load_encoder nor the HF
export carries them.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmm.batch import pack_masked
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.masking.base import MaskedTokens
from mmm.model import build_model
from mmm.registry import EMBEDDERS

V, D = 40, 32


def _model(decoder_layers):
    torch.manual_seed(0)
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0)
    obj = ObjectiveConfig("mlm", args={"decoder_layers": decoder_layers})
    return build_model(ModelConfig(encoder=enc), [obj], {"text": emb})


def _batch():
    return pack_masked([MaskedTokens(np.array([1, 3, 3, 9, 2]), np.array([1, 2]), np.array([11, 12])),
                        MaskedTokens(np.array([1, 3, 8, 2]), np.array([1]), np.array([13]))])


def test_the_decoder_sits_between_encoder_and_head_and_trains():
    model = _model(2)
    head = model.objectives["mlm"]
    assert len(head.decoder.blocks) == 2 and _model(0).objectives["mlm"].decoder is None
    batch = _batch()
    loss, _ = model(batch)
    t = batch.targets["text"]
    hidden = model.encode(batch)
    want = torch.nn.functional.cross_entropy(head.head(head.decoder(hidden, batch.seq)[t.positions]), t.labels)
    assert torch.allclose(loss, want, atol=1e-6)
    without = torch.nn.functional.cross_entropy(head.head(hidden[t.positions]), t.labels)
    assert not torch.allclose(loss, without)
    loss.backward()
    assert head.decoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_decoder_layers_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="decoder_layers must be an int >= 0"):
        _model(-1)


def test_exports_drop_the_decoder(tmp_path: Path):
    from conftest import REPO, TINY_OVERRIDES

    from mmm.config import load_config
    from mmm.encoders import load_encoder, read_checkpoint
    from mmm.train.pretrain import pretrain

    cfg = load_config(REPO / "configs" / "text_drbert_tiny.yaml", {
        **TINY_OVERRIDES, "trainer.default_root_dir": str(tmp_path / "run"), "trainer.max_steps": 2,
        "data.val": None})
    run = pretrain(cfg)
    state = read_checkpoint(run.last_checkpoint).state_dict
    assert any(k.startswith("objectives.mlm.decoder.blocks.0.") for k in state)  # trained and kept for resume
    enc = load_encoder(run.last_checkpoint)
    own = enc.state_dict()
    assert len(enc.encoder.blocks) == 2  # TINY_OVERRIDES' depth: no decoder block added
    assert not any("decoder" in k or k.startswith("objectives.") for k in own)
    for k, v in own.items():
        if k.startswith("encoder."):
            assert torch.equal(v, state[k]), k

    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from mmm.interop.hf import export_hf_bert

    out = export_hf_bert(run.last_checkpoint, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    tensors = load_file(str(out / "model.safetensors"))
    names = [k.removeprefix("bert.") for k in tensors]  # BertForMaskedLM: the encoder under bert., the head under cls.
    assert {int(k.split(".")[2]) for k in names if k.startswith("encoder.layer.")} == {0, 1}
    assert all(k.startswith(("embeddings.", "encoder.layer.", "pooler.", "cls.predictions.")) for k in names), names
