"""HF transformers BERT interop: import parity, export parity, round trips, tokenizer, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer  # noqa: E402

from mmm.config import ModelConfig  # noqa: E402
from mmm.encoders import TextEncoder, load_encoder, read_checkpoint  # noqa: E402
from mmm.interop.hf import (export_command, export_hf_bert, head_from_checkpoint, import_hf_bert,  # noqa: E402
                            import_hf_bert_mlm)
from mmm.objectives.mlm import MLMHead  # noqa: E402

HF_CFG = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64)
POOLER = {"pooler.dense.weight", "pooler.dense.bias"}


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random LayerNorm affines and biases, so swapped or dropped norms/biases cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.copy_((1.0 if name.endswith("LayerNorm.weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))


def _batch(vocab: int, lengths=(11, 6, 2), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def _hf_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1]


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).detach()[mask.bool()].abs().max())


@pytest.fixture(scope="module")
def hf_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**HF_CFG, attn_implementation="eager")).eval()
    _perturb(model)
    out = tmp_path_factory.mktemp("hf_bert")
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_import_matches_hf_bert_on_real_tokens(hf_bert_dir: Path, backend: str) -> None:
    hf = BertModel.from_pretrained(hf_bert_dir, attn_implementation="eager").eval()
    assert hf.embeddings.token_type_embeddings.weight.abs().sum() > 0  # the folding is exercised
    enc = import_hf_bert(hf_bert_dir)
    assert isinstance(enc, TextEncoder) and not enc.training and enc.tokenizer is None
    enc.encoder.cfg.attention = backend
    ids, mask = _batch(1000)
    with torch.no_grad():
        ours = enc(ids, mask)
    assert _max_diff(ours, hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask) <= 1e-4
    assert torch.all(ours[~mask.bool()] == 0)
    assert load_encoder(hf_bert_dir).state_dict().keys() == enc.state_dict().keys()


def test_import_prefixed_bin_and_mlm_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    hf = BertForMaskedLM(BertConfig(**HF_CFG, attn_implementation="eager")).eval()
    _perturb(hf, seed=1)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # bert.-prefixed keys, legacy .bin
    enc, head = import_hf_bert_mlm(tmp_path)
    assert head.tied_embedding is enc.embedder.tokens
    ids, mask = _batch(1000, seed=1)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = enc(ids, mask)
        logits = head(ours[mask.bool()])
    assert _max_diff(ours, out.hidden_states[-1], mask) <= 1e-4
    assert float((logits - out.logits[mask.bool()]).abs().max()) <= 1e-4


def test_export_checkpoint_matches_hf_masked_lm(ckpt: Path, tmp_path: Path) -> None:
    out = export_hf_bert(ckpt, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForMaskedLM"] and cfg["model_type"] == "bert" and cfg["type_vocab_size"] == 2
    enc = load_encoder(ckpt)
    head = head_from_checkpoint(read_checkpoint(ckpt).state_dict, enc, ckpt)
    assert head is not None
    hf, info = BertForMaskedLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.all(hf.bert.embeddings.token_type_embeddings.weight == 0)
    ids, mask = _batch(500, seed=2)
    with torch.no_grad():
        res = hf(input_ids=ids, attention_mask=mask, token_type_ids=(torch.arange(11) > 4).long().expand_as(ids),
                 output_hidden_states=True)
        ours = enc(ids, mask)
        logits = head(ours[mask.bool()])
    assert _max_diff(ours, res.hidden_states[-1], mask) <= 1e-4
    assert float((logits - res.logits[mask.bool()]).abs().max()) <= 1e-4
    # BertModel from the MLM layout: only the pooler is missing (mmm trains none), only the head is extra.
    base, info = BertModel.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert set(info["missing_keys"]) == POOLER
    assert info["unexpected_keys"] and all(k.startswith("cls.predictions.") for k in info["unexpected_keys"])
    assert _max_diff(ours, _hf_hidden(base.eval(), ids, mask), mask) <= 1e-4
    # The tokenizer files load in transformers and give the same ids.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Return the number of Items in the list, or None."
    assert tok(text)["input_ids"] == enc.tokenizer.tokenizer.encode(text).ids


def test_import_of_export_is_identity(ckpt: Path, tmp_path: Path) -> None:
    enc = load_encoder(ckpt)
    back = import_hf_bert(export_hf_bert(enc, tmp_path / "hf"))
    assert back.tokenizer is not None and back.tokenizer.roles == enc.tokenizer.roles
    sd = back.state_dict()
    assert sd.keys() == enc.state_dict().keys()
    for k, v in enc.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert back.config.encoder.dim == enc.config.encoder.dim and back.config.text.max_len == 64


def test_export_without_head_is_bert_model_layout(hf_bert_dir: Path, tmp_path: Path) -> None:
    enc = import_hf_bert(hf_bert_dir)
    out = export_hf_bert(enc, tmp_path / "base")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    from safetensors.torch import load_file

    assert not any(k.startswith(("bert.", "cls.")) for k in load_file(str(out / "model.safetensors")))
    base, info = BertModel.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert set(info["missing_keys"]) == POOLER and not info["unexpected_keys"]
    orig = BertModel.from_pretrained(hf_bert_dir, attn_implementation="eager").eval()
    ids, mask = _batch(1000, seed=4)
    # token type 0 is folded into the positions, so the re-exported model matches the original for type 0
    assert _max_diff(_hf_hidden(base.eval(), ids, mask), _hf_hidden(orig, ids, mask), mask) <= 1e-4


def test_untied_head_exports_separate_decoder(ckpt: Path, tmp_path: Path) -> None:
    enc = load_encoder(ckpt)
    torch.manual_seed(5)
    head = MLMHead(64, enc.vocab_size, enc.config.encoder.norm_eps, tied_embedding=None).eval()
    with torch.no_grad():
        head.bias.normal_()
    out = export_hf_bert(enc, tmp_path / "untied", mlm_head=head)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    hf = BertForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = _batch(500, seed=5)
    with torch.no_grad():
        res = hf(input_ids=ids, attention_mask=mask)
        logits = head(enc(ids, mask)[mask.bool()])
    assert float((logits - res.logits[mask.bool()]).abs().max()) <= 1e-4
    enc2, head2 = import_hf_bert_mlm(out)
    assert head2.tied_embedding is None and torch.equal(head2.decoder_weight, head.decoder_weight)


def test_vocab_txt_builds_a_bert_wordpiece_tokenizer(hf_bert_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "with_vocab"
    shutil.copytree(hf_bert_dir, d)
    words = ["the", "quick", "brown", "fox", "jump", "##s", "##ed", "over", "lazy", "dog", "café", "cafe", ".", ","]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [f"w{i}" for i in range(1000 - 5 - len(words))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    text = "The quick brown fox jumped over the lazy dogs, Café [MASK] zebra."
    for lower in (True, False):
        (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
        enc = import_hf_bert(d)
        assert enc.tokenizer.kind == "wordpiece" and enc.tokenizer.lowercase is lower
        ref = BertTokenizer(str(d / "vocab.txt"), do_lower_case=lower)
        assert enc.tokenizer.tokenizer.encode(text).ids == ref(text)["input_ids"]
        assert enc.tokenizer.mask_id == 4 and enc.tokenizer.pad_id == 0


def test_a_folder_with_only_tokenizer_json_reads_as_hf_reads_it(ckpt: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Many Hub folders ship tokenizer.json without vocab.txt; it was refused ("no tokenizer"), while the error
    said tokenizer.json would do and transformers.AutoTokenizer reads the folder."""
    from transformers import AutoTokenizer

    out = export_hf_bert(ckpt, tmp_path / "hf")
    (out / "vocab.txt").unlink()
    (out / "mmm_tokenizer.json").unlink()
    enc = import_hf_bert(out)
    ref = AutoTokenizer.from_pretrained(str(out))
    text = "Return the list of items, sorted by key; raise ValueError if empty."
    assert enc.tokenizer.kind == "wordpiece"
    assert enc.tokenizer.encode(text)[0].tolist() == ref(text, add_special_tokens=False)["input_ids"]
    assert (enc.tokenizer.cls_id, enc.tokenizer.mask_id) == (ref.cls_token_id, ref.mask_token_id)
    (out / "tokenizer.json").write_text("{not json")  # unreadable: the encoder loads without a tokenizer, said
    with caplog.at_level("WARNING", logger="mmm.export"):
        assert import_hf_bert(out).tokenizer is None
    assert "tokenizer.json: not a readable HF tokenizer.json" in caplog.text and "without a tokenizer" in caplog.text


def test_export_command_prints_and_writes(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = export_command(ckpt, tmp_path / "cli")
    assert (out / "model.safetensors").is_file() and (out / "vocab.txt").is_file()
    assert "BertForMaskedLM" in capsys.readouterr().out


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_import_errors(hf_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_hf_bert(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"config.json: model_type is 'roberta'"):
        import_hf_bert(_edit_config(hf_bert_dir, tmp_path / "roberta", model_type="roberta"))
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        import_hf_bert(_edit_config(hf_bert_dir, tmp_path / "act", hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        import_hf_bert(_edit_config(hf_bert_dir, tmp_path / "rel", position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match=r"model.safetensors: weight 'encoder.layer.2.attention.self.query.weight' is missing"):
        import_hf_bert(_edit_config(hf_bert_dir, tmp_path / "deep", num_hidden_layers=3))
    nothing = _edit_config(hf_bert_dir, tmp_path / "noweights")
    (nothing / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        import_hf_bert(nothing)


@pytest.mark.parametrize("field,value", [("encoder.norm_first", True), ("encoder.mlp", "swiglu"),
                                         ("encoder.final_norm", True), ("encoder.relative_position", "alibi"),
                                         ("text.position", "sinusoidal"), ("text.embed_norm", False),
                                         ("encoder.qkv_bias", False)])
def test_unsupported_configs_are_refused_by_name(field: str, value, tmp_path: Path) -> None:
    cfg = ModelConfig()
    cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.heads, cfg.text.max_len = 32, 1, 2, 16
    part, key = field.split(".")
    setattr(getattr(cfg, part), key, value)
    enc = TextEncoder.from_config(cfg, vocab_size=50)
    with pytest.raises(ValueError, match=rf"model\.{field}={value!r} is not representable"):
        export_hf_bert(enc, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- review fixes


def _edit_ckpt(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` at ``dst``, its raw dict changed in place by ``edit``."""
    raw = torch.load(src, map_location="cpu", weights_only=True)
    edit(raw)
    torch.save(raw, dst)
    return dst


def _rename_head(raw, old: str, new: str) -> None:
    sd = raw["state_dict"]
    for k in [k for k in sd if k.startswith(f"model.objectives.{old}.")]:
        sd[f"model.objectives.{new}." + k[len(f"model.objectives.{old}."):]] = sd.pop(k)


def _masked_lm_logits_match(out: Path, enc: TextEncoder, head: MLMHead, seed: int) -> float:
    hf = BertForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = _batch(enc.vocab_size, seed=seed)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        ours = head(enc(ids, mask)[mask.bool()])
    return float((ref - ours).abs().max())


def test_export_takes_a_labelled_text_mlm_head(ckpt: Path, tmp_path: Path) -> None:
    def relabel(raw):
        objectives = raw["mmm"]["config"]["objectives"]  # as in configs/multimodal_tiny.yaml
        objectives[0]["label"] = "mlm_text"
        objectives.insert(0, {**objectives[0], "label": "mlm_dna", "args": {"modality": "dna", "tie_weights": True}})
        _rename_head(raw, "mlm", "mlm_text")

    src = _edit_ckpt(ckpt, tmp_path / "label.ckpt", relabel)
    from mmm.interop.hf import text_mlm_head_name

    assert text_mlm_head_name(read_checkpoint(src)) == ("mlm_text", [])  # the DNA MLM head is not a text head
    out = export_hf_bert(src, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    enc = load_encoder(src)
    head = head_from_checkpoint(read_checkpoint(src).state_dict, enc, src, "mlm_text")
    assert _masked_lm_logits_match(out, enc, head, seed=6) <= 1e-4


def test_export_of_several_text_mlm_heads_takes_the_first_listed(ckpt: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def two_heads(raw):
        objectives = raw["mmm"]["config"]["objectives"]
        objectives[0]["label"] = "mlm_a"
        objectives.insert(0, {**objectives[0], "label": "mlm_z", "args": dict(objectives[0]["args"])})
        _rename_head(raw, "mlm", "mlm_a")
        sd = raw["state_dict"]
        for k in [k for k in sd if k.startswith("model.objectives.mlm_a.")]:
            sd[k.replace(".mlm_a.", ".mlm_z.")] = sd[k].clone()
        sd["model.objectives.mlm_z.head.bias"] += 1.0 + torch.randn_like(sd["model.objectives.mlm_z.head.bias"])

    src = _edit_ckpt(ckpt, tmp_path / "two.ckpt", two_heads)
    with caplog.at_level("WARNING", logger="mmm.export"):
        out = export_hf_bert(src, tmp_path / "hf")
    assert "2 text MLM heads ['mlm_z', 'mlm_a']; exporting the first listed in objectives, 'mlm_z'" in caplog.text
    enc = load_encoder(src)
    head = head_from_checkpoint(read_checkpoint(src).state_dict, enc, src, "mlm_z")
    assert _masked_lm_logits_match(out, enc, head, seed=7) <= 1e-4


def test_export_leaves_out_an_mlm_head_trained_on_lxmert_cross_modality_layers(ckpt: Path, tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A two-stream (LXMERT) run's MLM head reads the fused states: on the bare text encoder in HF it predicts
    other tokens. It was exported as BertForMaskedLM without a word."""
    def two_stream(raw):
        raw["mmm"]["config"]["model"]["image_text"] = {**raw["mmm"]["config"]["model"].get("image_text", {}),
                                                       "layout": "two_stream", "cross_layers": 2}

    src = _edit_ckpt(ckpt, tmp_path / "lxmert.ckpt", two_stream)
    with caplog.at_level("WARNING", logger="mmm.export"):
        out = export_hf_bert(src, tmp_path / "hf")
    assert "trained on the output of 2 LXMERT cross-modality layer(s)" in caplog.text and "without the head" in caplog.text
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]


def test_export_leaves_out_a_drbert_decoder_head(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 capsys: pytest.CaptureFixture) -> None:
    import dataclasses

    from mmm.core.encoder import TransformerEncoder

    decoder = TransformerEncoder(dataclasses.replace(read_checkpoint(ckpt).config.model.encoder, depth=1))

    def drbert(raw):
        raw["mmm"]["config"]["objectives"][0]["args"]["decoder_layers"] = 1
        raw["state_dict"].update({f"model.objectives.mlm.decoder.{k}": v for k, v in decoder.state_dict().items()})

    src = _edit_ckpt(ckpt, tmp_path / "drbert.ckpt", drbert)
    with caplog.at_level("WARNING", logger="mmm.export"):
        out = export_hf_bert(src, tmp_path / "hf")
    assert "1-layer DrBERT decoder (decoder_layers=1)" in caplog.text and "without the head" in caplog.text
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    from safetensors.torch import load_file

    assert not any(k.startswith(("bert.", "cls.")) for k in load_file(str(out / "model.safetensors")))
    base, info = BertModel.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert set(info["missing_keys"]) == POOLER and not info["unexpected_keys"]
    enc = load_encoder(src)
    ids, mask = _batch(500, seed=8)
    with torch.no_grad():
        assert _max_diff(enc(ids, mask), _hf_hidden(base.eval(), ids, mask), mask) <= 1e-4
    export_command(src, tmp_path / "cli")
    printed = capsys.readouterr().out
    assert "note: the MLM head 'mlm'" in printed and "as BertModel" in printed


def test_import_untied_head_adds_the_decoder_bias(tmp_path: Path) -> None:
    torch.manual_seed(9)
    hf = BertForMaskedLM(BertConfig(**HF_CFG, tie_word_embeddings=False, attn_implementation="eager")).eval()
    _perturb(hf, seed=9)
    p = hf.cls.predictions
    with torch.no_grad():  # an untied head trains decoder.bias; predictions.bias stays as it was
        p.decoder.bias.copy_(torch.randn(p.decoder.bias.shape))
    assert not torch.equal(p.decoder.bias, p.bias)
    hf.save_pretrained(tmp_path)
    enc, head = import_hf_bert_mlm(tmp_path)
    assert head.tied_embedding is None and torch.equal(head.bias, p.decoder.bias)
    assert _masked_lm_logits_match(tmp_path, enc, head, seed=9) <= 1e-4


def test_import_tied_config_with_a_different_stored_decoder(tmp_path: Path) -> None:
    """transformers 5 does not tie a stored decoder weight/bias that differs from its tie source: neither does import."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(10)
    BertForMaskedLM(BertConfig(**HF_CFG)).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["cls.predictions.decoder.weight"] = 0.02 * torch.randn(1000, 64)
    weights["cls.predictions.decoder.bias"] = torch.randn(1000)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    enc, head = import_hf_bert_mlm(tmp_path)
    assert _masked_lm_logits_match(tmp_path, enc, head, seed=10) <= 1e-4


def test_export_refuses_a_dna_encoder_before_writing(tmp_path: Path) -> None:
    from mmm.interop.hf import check_exportable

    cfg = ModelConfig()
    cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.heads, cfg.dna.max_len = 32, 1, 2, 40
    enc = TextEncoder.from_config(cfg, vocab_size=30, modality="dna")
    with pytest.raises(ValueError, match="cannot export to HF BERT: this is a 'dna' encoder; only text encoders"):
        export_hf_bert(enc, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="'dna' encoder"):
        check_exportable(cfg, "dna")


def test_corrupt_hf_weights_are_a_user_error_naming_the_file(hf_bert_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from mmm.cli import main
    from mmm.errors import CheckpointError

    bad = _edit_config(hf_bert_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=rf"{weights} is not a readable safetensors file"):
        import_hf_bert(bad)
    assert main(["export", "hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is not a readable safetensors file" in err and "unexpected error" not in err


def test_an_hf_folder_asked_for_as_another_modality_names_why(hf_bert_dir: Path) -> None:
    """It said the folder held no config.json, though it did."""
    with pytest.raises(ValueError, match=r"holds an HF config.json, which mmm reads as a text \(BERT\) encoder only, "
                                         r"not as a image encoder"):
        load_encoder(hf_bert_dir, modality="image")


WORDS = ["the", "list", "items", "return", "number", "of", "none", "or", "in", "a", "value", "key"]


@pytest.fixture(scope="module")
def hf_bert_with_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF BertModel with distinct token-type rows and a WordPiece vocab.txt (BERT's special ids 0, 100-103)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    torch.manual_seed(3)
    model = BertModel(BertConfig(**{**HF_CFG, "vocab_size": len(vocab)}, attn_implementation="eager")).eval()
    _perturb(model, seed=3)
    out = tmp_path_factory.mktemp("hf_bert_vocab")
    model.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return out


PAIRS = [("return the list", "the number of items"), ("none", "a key or a value in the list of items"),
         ("the value of a key", "none")]


def test_pairs_through_an_imported_bert_match_bert_model_with_token_type_ids(hf_bert_with_vocab: Path) -> None:
    """mmm had no segment embeddings: an imported BERT's token_type row 1 (a pair's second text) was dropped, so
    pair features differed from BertModel's with the token_type_ids its tokenizer gives."""
    from mmm.modalities.text.downstream import TextInputs

    hf = BertModel.from_pretrained(hf_bert_with_vocab, attn_implementation="eager").eval()
    types = hf.embeddings.token_type_embeddings.weight.detach()
    assert float((types[1] - types[0]).norm()) > 0.1
    enc = import_hf_bert(hf_bert_with_vocab)
    assert enc.config.text.segments == 2 and enc.embedder.segments.weight.shape == (2, HF_CFG["hidden_size"])
    hf_tok = BertTokenizer(str(hf_bert_with_vocab / "vocab.txt"))
    batch = hf_tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    assert set(batch["token_type_ids"].unique().tolist()) == {0, 1}
    adapter = TextInputs(enc, str(hf_bert_with_vocab))
    items = [adapter.prepare(p) for p in PAIRS]
    for row, item in zip(batch["input_ids"], items):  # mmm forms the pair as HF's tokenizer does
        assert row[: len(item)].tolist() == item.tolist()
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        ours = enc(batch["input_ids"], batch["attention_mask"])  # the padded API
        packed, _ = adapter.encode_packed(items)  # embed / finetune / probes
    mask = batch["attention_mask"]
    assert _max_diff(ours, ref, mask) <= 1e-4
    assert float((packed - ref[mask.bool()]).abs().max()) <= 1e-4
    # single texts are segment 0 throughout, as HF with no token_type_ids
    single = hf_tok([a for a, _ in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert _max_diff(enc(single["input_ids"], single["attention_mask"]), hf(**single).last_hidden_state,
                         single["attention_mask"]) <= 1e-4


def test_an_imported_bert_with_segments_exports_and_reimports_exactly(hf_bert_with_vocab: Path, tmp_path: Path) -> None:
    enc = import_hf_bert(hf_bert_with_vocab)
    out = export_hf_bert(enc, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["type_vocab_size"] == 2
    hf = BertModel.from_pretrained(out, attn_implementation="eager").eval()
    hf_tok = BertTokenizer(str(hf_bert_with_vocab / "vocab.txt"))
    batch = hf_tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert _max_diff(enc(batch["input_ids"], batch["attention_mask"]), hf(**batch).last_hidden_state,
                         batch["attention_mask"]) <= 1e-4
    back = import_hf_bert(out)
    assert back.config.text.segments == 2
    for k, v in enc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    saved = tmp_path / "saved"  # mmm's own encoder format keeps the table and the [SEP] id it needs
    from mmm.encoders import save_encoder

    save_encoder(enc, saved)
    again = load_encoder(saved)
    assert again.config.text.segments == 2 and torch.equal(again.embedder.segments.weight, enc.embedder.segments.weight)


def test_an_imported_bert_without_a_tokenizer_keeps_row_0_and_says_pairs_are_not_exact(
        hf_bert_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No tokenizer gives the [SEP] id a segment starts at: row 0 is folded in (exact for single texts), with a word."""
    import logging

    with caplog.at_level(logging.WARNING):
        enc = import_hf_bert(hf_bert_dir)
    assert enc.config.text.segments == 0 and enc.embedder.segments is None
    assert "only row 0 of token_type_embeddings is imported" in caplog.text


def test_a_token_type_table_with_equal_rows_is_folded_exactly(hf_bert_with_vocab: Path, tmp_path: Path) -> None:
    """Equal rows (e.g. mmm's zero export table) make token_type_ids irrelevant: no segment table is imported."""
    hf = BertModel.from_pretrained(hf_bert_with_vocab, attn_implementation="eager").eval()
    with torch.no_grad():
        hf.embeddings.token_type_embeddings.weight[1] = hf.embeddings.token_type_embeddings.weight[0]
    hf.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text((hf_bert_with_vocab / "vocab.txt").read_text())
    enc = import_hf_bert(tmp_path)
    assert enc.config.text.segments == 0
    batch = BertTokenizer(str(tmp_path / "vocab.txt"))([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True,
                                                       return_tensors="pt")
    with torch.no_grad():
        assert _max_diff(enc(batch["input_ids"], batch["attention_mask"]), hf(**batch).last_hidden_state,
                         batch["attention_mask"]) <= 1e-4
