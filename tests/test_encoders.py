"""TextEncoder, load_encoder and save_encoder against a real (3-step) mmm pretraining checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmm.config import ModelConfig
from mmm.core.packing import pack_padded
from mmm.encoders import TextEncoder, load_encoder, read_checkpoint, save_encoder
from mmm.model import build_model, build_text_embedder


def _batch(vocab: int, lengths=(12, 7, 3), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = 0
    return ids, mask


def test_checkpoint_encoder_matches_the_trained_model(ckpt: Path) -> None:
    enc = load_encoder(ckpt)
    assert isinstance(enc, TextEncoder) and not enc.training
    assert enc.tokenizer is not None and enc.tokenizer.vocab_size == enc.vocab_size == 500
    # Reference: the full MaskedModel rebuilt from the same checkpoint, run on the packed batch.
    contents = read_checkpoint(ckpt)
    model = build_model(contents.config.model, contents.config.objectives,
                        {"text": build_text_embedder(contents.config.model, 500, 0)})
    model.load_state_dict(contents.state_dict)
    model.eval()
    ids, mask = _batch(500)
    seq = pack_padded(mask)
    with torch.no_grad():
        ref = model.encoder(model.embedders["text"](ids[mask.bool()], seq.position_ids), seq)
        out = enc(ids, mask)
    assert out.shape == (3, 12, 64)
    torch.testing.assert_close(out[mask.bool()], ref, atol=1e-5, rtol=0)
    assert torch.all(out[~mask.bool()] == 0), "padded positions must be exactly zero"
    # Trained weights really were loaded (not a fresh init).
    assert torch.equal(enc.embedder.tokens.weight, contents.state_dict["embedders.text.tokens.weight"])


def test_default_mask_and_extra_trailing_padding(ckpt: Path) -> None:
    enc = load_encoder(ckpt)
    ids, mask = _batch(500, lengths=(6, 6))
    with torch.no_grad():
        full = enc(ids)
        padded = enc(torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1),
                     torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], 1))
        single = enc(ids[:1], mask[:1].bool())
    assert padded.shape == (2, 10, 64)
    torch.testing.assert_close(padded[:, :6], full, atol=1e-5, rtol=0)
    assert torch.all(padded[:, 6:] == 0)
    torch.testing.assert_close(single[0], full[0], atol=1e-5, rtol=0)


def test_save_encoder_round_trip(ckpt: Path, tmp_path: Path) -> None:
    enc = load_encoder(ckpt)
    out = save_encoder(enc, tmp_path / "saved")
    assert {p.name for p in out.iterdir()} >= {"mmm_encoder.json", "model.safetensors", "tokenizer"}
    back = load_encoder(out)
    assert isinstance(back, TextEncoder) and not back.training
    assert back.config == enc.config
    for k, v in enc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    text = "The quick brown fox returns a list of values."
    assert back.tokenizer.encode(text)[0].tolist() == enc.tokenizer.encode(text)[0].tolist()
    ids, mask = _batch(500, seed=3)
    with torch.no_grad():
        assert torch.equal(back(ids, mask), enc(ids, mask))


def test_forward_rejects_bad_input(ckpt: Path) -> None:
    enc = load_encoder(ckpt)
    ids, mask = _batch(500)
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        enc(ids[0])
    with pytest.raises(TypeError, match="integer tensor"):
        enc(ids.float(), mask)
    with pytest.raises(ValueError, match="shape of input_ids"):
        enc(ids, mask[:, :5])
    with pytest.raises(ValueError, match="left padding"):
        enc(ids, mask.flip(1))
    with pytest.raises(ValueError, match="only 0 and 1"):
        enc(ids, mask * 2)
    with pytest.raises(ValueError, match=r"\[0, 500\)"):
        enc(ids + 1000, mask)
    long_ids = torch.randint(5, 500, (1, 65))
    with pytest.raises(ValueError, match="max_len=64"):
        enc(long_ids)
    with pytest.raises(ValueError, match="at least one real token"):
        enc(ids, torch.zeros_like(mask))


def test_load_encoder_errors(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match=r"unknown modality 'video'; supported: \['text', 'image'"):
        load_encoder(ckpt, modality="video")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither mmm_encoder.json"):
        load_encoder(tmp_path / "empty")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt is not a PyTorch checkpoint"):
        load_encoder(junk)
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {"model.embedders.text.tokens.weight": torch.zeros(3, 2)}}, bare)
    with pytest.raises(ValueError, match="bare.ckpt has no 'mmm' section"):
        load_encoder(bare)
    # Same metadata, a weight too many: the message names the file and the key.
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["state_dict"]["model.encoder.blocks.9.attn.qkv.weight"] = torch.zeros(1)
    extra = tmp_path / "extra.ckpt"
    torch.save(raw, extra)
    with pytest.raises(ValueError, match=r"extra.ckpt: weights do not match.*blocks\.9"):
        load_encoder(extra)


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: harmless, but proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "mmm": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="refusing to load .*evil.ckpt.*weights_only=True"):
        load_encoder(evil)
    assert not marker.exists(), "the pickled payload ran"
    # The payload is real: an unsafe load would have run it.
    torch.load(evil, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_from_config_builds_and_saves_without_tokenizer(tmp_path: Path) -> None:
    cfg = ModelConfig()
    cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.heads, cfg.text.max_len = 32, 1, 2, 16
    enc = TextEncoder.from_config(cfg, vocab_size=50).eval()
    back = load_encoder(save_encoder(enc, tmp_path / "e"))
    assert back.tokenizer is None
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert torch.equal(back(ids), enc(ids))


def test_pad_batch_feeds_the_encoder_like_an_hf_tokenizer(ckpt: Path) -> None:
    enc = load_encoder(ckpt)
    tok = enc.tokenizer
    batch = tok.pad_batch(["masked modeling", "one shared encoder for every modality of data"], max_len=64)
    assert batch["input_ids"][:, 0].eq(tok.cls_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(tok.encode(t)[0]) + 2 for t in
                                                      ["masked modeling", "one shared encoder for every modality of data"]]
    hidden = enc(**batch)
    assert hidden.shape == (*batch["input_ids"].shape, enc.hidden_size)
    with pytest.raises(ValueError, match="text 0 is .* over max_len=4"):
        tok.pad_batch(["a much longer text than four tokens"], max_len=4)
    assert tok.pad_batch(["a much longer text than four tokens"], max_len=4, truncate=True)["input_ids"].shape == (1, 4)


def test_save_without_tokenizer_removes_a_stale_one(ckpt: Path, tmp_path: Path) -> None:
    out = save_encoder(load_encoder(ckpt), tmp_path / "e")  # a 500-id tokenizer in e/tokenizer
    cfg = ModelConfig()
    cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.heads, cfg.text.max_len = 32, 1, 2, 16
    save_encoder(TextEncoder.from_config(cfg, vocab_size=300).eval(), out)  # another encoder, no tokenizer
    assert not (out / "tokenizer").exists()
    back = load_encoder(out)
    assert back.tokenizer is None and back.vocab_size == 300


def test_saved_tokenizer_larger_than_the_token_table_is_refused(ckpt: Path, tmp_path: Path) -> None:
    import json
    import shutil

    cfg = ModelConfig()
    cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.heads, cfg.text.max_len = 32, 1, 2, 16
    out = save_encoder(TextEncoder.from_config(cfg, vocab_size=300).eval(), tmp_path / "e")
    shutil.copytree(save_encoder(load_encoder(ckpt), tmp_path / "other") / "tokenizer", out / "tokenizer")
    assert json.loads((out / "mmm_encoder.json").read_text())["vocab_size"] == 300
    with pytest.raises(ValueError, match=r"tokenizer: the tokenizer has 500 ids but the encoder's token table .* has 300"):
        load_encoder(out)


def test_resaving_into_the_same_folder_keeps_the_tokenizer(ckpt: Path, tmp_path: Path) -> None:
    out = save_encoder(load_encoder(ckpt), tmp_path / "e")
    save_encoder(load_encoder(out), out)
    back = load_encoder(out)
    assert back.tokenizer is not None and back.tokenizer.vocab_size == 500


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_saved_weights_name_the_file(ckpt: Path, tmp_path: Path, damage: str) -> None:
    from mmm.errors import CheckpointError, UserError
    from mmm.warm_start import WarmStartError, read_source

    out = save_encoder(load_encoder(ckpt), tmp_path / "e")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00\x01garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{weights} is not a readable safetensors file") as info:
        load_encoder(out)
    assert isinstance(info.value, UserError)
    with pytest.raises(WarmStartError, match=rf"cannot read {out}: {weights} is not a readable safetensors file"):
        read_source(out)


def _with_attention(ckpt: Path, dst: Path, backend: str) -> Path:
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["mmm"]["config"]["model"]["encoder"]["attention"] = backend
    torch.save(raw, dst)
    return dst


@pytest.mark.parametrize("backend", ["xformers", "flex"])
def test_encoder_trained_on_a_gpu_backend_loads_and_runs_on_cpu(ckpt: Path, tmp_path: Path, backend: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMM_ATTENTION", raising=False)
    src = _with_attention(ckpt, tmp_path / f"{backend}.ckpt", backend)
    ids, mask = _batch(500, seed=4)
    with torch.no_grad():
        ref = load_encoder(ckpt)(ids, mask)
        enc = load_encoder(src)
        assert enc.config.encoder.attention == "auto" and enc.encoder.backend_for(torch.device("cpu")) == "sdpa"
        assert torch.equal(enc(ids, mask), ref)
        # a saved encoder that still names the GPU backend loads on CPU too
        kept = load_encoder(src, attention=None)
        assert kept.config.encoder.attention == backend
        with pytest.raises(RuntimeError, match=f"attention backend '{backend}' requested"):
            kept(ids, mask)
        saved = save_encoder(kept, tmp_path / "saved")
        back = load_encoder(saved)
        assert back.config.encoder.attention == "auto"
        torch.testing.assert_close(back(ids, mask), ref, atol=1e-5, rtol=0)
        math = load_encoder(saved, attention="math")
        assert math.encoder.backend_for(torch.device("cpu")) == "math"
        torch.testing.assert_close(math(ids, mask), ref, atol=1e-5, rtol=0)
        monkeypatch.setenv("MMM_ATTENTION", "math")  # the variable still replaces `auto`
        assert load_encoder(saved).encoder.backend_for(torch.device("cpu")) == "math"


def test_load_encoder_refuses_an_unknown_attention_backend(ckpt: Path) -> None:
    with pytest.raises(ValueError, match=r"attention='fast' is not an attention backend; expected one of \['auto'"):
        load_encoder(ckpt, attention="fast")
