"""model.init_from: warm start from an mmm checkpoint, a saved encoder folder or an HF BERT folder,
with a report of what was loaded, newly initialised and ignored, and shape mismatches refused by name."""
import dataclasses
from pathlib import Path

import pytest
import torch

from mmm.config import ObjectiveConfig
from mmm.encoders import load_encoder, read_checkpoint, save_encoder
from mmm.model import build_model
from mmm.warm_start import warm_start
from mmm.registry import EMBEDDERS
from mmm.warm_start import WarmStartError, fold_names, warm_start


def _model(contents, init_from=None, objectives=None, **encoder):
    """A model shaped like the checkpoint's (its vocabulary and sizes), optionally changed."""
    cfg = contents.config.model
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **encoder), init_from=init_from)
    vocab = contents.state_dict["embedders.text.tokens.weight"].shape[0]
    emb = EMBEDDERS.create("text", vocab_size=vocab, dim=cfg.encoder.dim, max_len=cfg.text.max_len,
                           position=cfg.text.position, embed_norm=cfg.text.embed_norm, norm_eps=cfg.encoder.norm_eps,
                           dropout=cfg.encoder.dropout, pad_id=0)
    torch.manual_seed(123)
    model = build_model(cfg, objectives or contents.config.objectives, {"text": emb})
    if init_from:
        warm_start(model, init_from)
    return model


def test_from_checkpoint_loads_every_tensor_and_prints_it(ckpt: Path, capsys):
    contents = read_checkpoint(ckpt)
    model = _model(contents, init_from=str(ckpt))
    out = capsys.readouterr().out
    state = model.state_dict()
    assert set(state) == set(contents.state_dict)
    for k, v in state.items():
        assert torch.equal(v, contents.state_dict[k]), k
    assert f"init_from {ckpt} (checkpoint): {len(state)} tensors loaded, 0 newly initialised, 0 ignored" in out
    assert "encoder.blocks.*.attn.qkv.weight x2" in out


def test_a_deeper_model_keeps_the_extra_blocks_initialised(ckpt: Path):
    contents = read_checkpoint(ckpt)
    fresh = _model(contents, depth=3)
    model = _model(contents, depth=3)
    report = warm_start(model, ckpt, verbose=False)
    assert all(k.startswith("encoder.blocks.2.") for k in report.initialised) and report.initialised
    assert not report.ignored
    for k in report.initialised:  # untouched: the builder's initialisation (same seed)
        assert torch.equal(model.state_dict()[k], fresh.state_dict()[k])
    assert torch.equal(model.encoder.blocks[1].mlp.fc1.weight,
                       contents.state_dict["encoder.blocks.1.mlp.fc1.weight"])


def test_an_electra_discriminator_starts_from_an_mlm_checkpoint(ckpt: Path):
    contents = read_checkpoint(ckpt)
    electra = [ObjectiveConfig("electra", args={"embedding_sharing": "gdes", "generator_size": 0.25})]
    model = _model(contents, objectives=electra)
    report = warm_start(model, ckpt, verbose=False)
    assert any(k.startswith("objectives.electra.generator.") for k in report.initialised)
    assert any(k.startswith("objectives.mlm.head.") for k in report.ignored)
    assert "embedders.text.tokens.weight" in report.loaded
    # under gdes the discriminator's table is generator table + residual: it equals the MLM table
    assert torch.allclose(model.embedders["text"].tokens.weight, contents.state_dict["embedders.text.tokens.weight"],
                          atol=1e-6)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(ckpt: Path):
    contents = read_checkpoint(ckpt)
    model = _model(contents, mlp_hidden=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WarmStartError, match=r"tensor 'encoder\.blocks\.0\.mlp\.fc1\.weight' has shape \(128, 64\) "
                                             r"there but \(96, 64\) in this model \(and 5 more"):
        warm_start(model, ckpt, verbose=False)
    for k, v in model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_from_a_saved_encoder_folder(ckpt: Path, tmp_path: Path):
    contents = read_checkpoint(ckpt)
    folder = save_encoder(load_encoder(ckpt), tmp_path / "enc")
    model = _model(contents)
    report = warm_start(model, folder, verbose=False)
    assert report.kind == "encoder"
    assert report.loaded and all(k.startswith(("embedders.text.", "encoder.")) for k in report.loaded)
    assert report.initialised and all(k.startswith("objectives.") for k in report.initialised)
    assert not report.ignored
    for k in report.loaded:
        assert torch.equal(model.state_dict()[k], contents.state_dict[k]), k


def test_from_an_hf_bert_folder(ckpt: Path, tmp_path: Path):
    pytest.importorskip("transformers")
    from mmm.interop.hf import export_hf_bert

    contents = read_checkpoint(ckpt)
    folder = export_hf_bert(ckpt, tmp_path / "hf")  # BertForMaskedLM: encoder + MLM head
    model = _model(contents)
    report = warm_start(model, folder, verbose=False)
    assert report.kind == "hf_bert"
    assert "objectives.mlm.head.dense.weight" in report.loaded
    assert not report.initialised
    for k in report.loaded:
        assert torch.allclose(model.state_dict()[k], contents.state_dict[k], atol=0, rtol=0), k


def test_an_hf_head_goes_to_a_labelled_text_mlm_head(ckpt: Path, tmp_path: Path):
    """A multimodal run names its text MLM head by its label (objectives.mlm_text.head): the HF head lands there."""
    pytest.importorskip("transformers")
    from mmm.interop.hf import export_hf_bert

    contents = read_checkpoint(ckpt)
    folder = export_hf_bert(ckpt, tmp_path / "hf")
    labelled = [dataclasses.replace(o, label="mlm_text") if o.name == "mlm" else o for o in contents.config.objectives]
    model = _model(contents, objectives=labelled)
    report = warm_start(model, folder, verbose=False)
    assert "objectives.mlm_text.head.dense.weight" in report.loaded and not report.ignored
    for k in report.loaded:
        src = k.replace("objectives.mlm_text.", "objectives.mlm.")
        assert torch.equal(model.state_dict()[k], contents.state_dict[src]), k


def test_unreadable_sources_are_errors_naming_them(tmp_path: Path, ckpt: Path):
    contents = read_checkpoint(ckpt)
    model = _model(contents)
    with pytest.raises(WarmStartError, match="does not exist"):
        warm_start(model, tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WarmStartError, match="neither mmm_encoder.json"):
        warm_start(model, tmp_path / "empty")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(WarmStartError, match="junk.ckpt"):
        warm_start(model, tmp_path / "junk.ckpt")


def test_fold_names():
    assert fold_names(["encoder.blocks.0.a.weight", "encoder.blocks.1.a.weight", "head.bias"]) == [
        "encoder.blocks.*.a.weight x2", "head.bias"]


def test_pretrain_warm_starts_from_init_from(ckpt: Path, tmp_path: Path, capsys):
    from conftest import tiny_config

    from mmm.train.pretrain import build_run

    run = build_run(tiny_config(tmp_path / "run", **{"model.init_from": str(ckpt), "trainer.max_steps": 1,
                                                     "model.text.tokenizer_path": str(ckpt.parent.parent / "tokenizer"),
                                                     "data.val": None}))
    assert "tensors loaded, 0 newly initialised, 0 ignored" in capsys.readouterr().out
    contents = read_checkpoint(ckpt)
    assert torch.equal(run.module.model.encoder.blocks[0].attn.qkv.weight,
                       contents.state_dict["encoder.blocks.0.attn.qkv.weight"])


def test_warm_start_source_is_read_once_not_on_resume_or_load(ckpt: Path, tmp_path: Path):
    """Resuming, and loading the run's encoder, never read model.init_from again (it may be gone)."""
    import shutil

    from conftest import tiny_config

    import mmm
    from mmm.train.pretrain import pretrain

    source = tmp_path / "source.ckpt"
    shutil.copy(ckpt, source)
    run_dir = tmp_path / "run"
    tokenizer = str(ckpt.parent.parent / "tokenizer")
    pretrain(tiny_config(run_dir, **{"model.init_from": str(source), "trainer.max_steps": 1, "data.val": None,
                                     "model.text.tokenizer_path": tokenizer}))
    source.unlink()
    assert mmm.load_encoder(run_dir / "checkpoints" / "last.ckpt", modality="text") is not None
    run = pretrain(tiny_config(run_dir, **{"model.init_from": str(source), "trainer.max_steps": 2, "data.val": None,
                                           "model.text.tokenizer_path": tokenizer, "trainer.ckpt_path": "last"}))
    assert run.trainer.global_step == 2


def test_a_warm_start_refuses_another_tokenizer_than_the_sources(ckpt: Path, tmp_path: Path):
    """Token ids must mean what they meant in the source: a tokenizer given (or fitted here) that differs from
    the one the checkpoint stores was used silently, its ids reading other rows of the loaded embeddings."""
    from conftest import tiny_config

    from mmm.registry import TOKENIZERS
    from mmm.train.pretrain import build_run

    other = tmp_path / "other_tok"
    TOKENIZERS.create("wordpiece", texts=["a tokenizer fitted on other text"] * 20, vocab_size=60,
                      lowercase=True).save(other)
    with pytest.raises(WarmStartError, match=rf"model.text.tokenizer_path {other} is not the tokenizer "
                                             rf"model.init_from .* was trained with \(stored in the checkpoint\)"):
        build_run(tiny_config(tmp_path / "given", **{"model.init_from": str(ckpt), "model.text.tokenizer_path":
                                                     str(other), "data.val": None}))
    assert not (tmp_path / "given" / "tokenizer").exists()  # refused before anything was fitted or copied
    folder = save_encoder(load_encoder(ckpt, modality="text"), tmp_path / "enc")  # its tokenizer in enc/tokenizer
    with pytest.raises(WarmStartError, match=rf"is not the tokenizer model.init_from {folder} was trained with "
                                             rf"\(saved in {folder / 'tokenizer'}\)"):
        build_run(tiny_config(tmp_path / "given2", **{"model.init_from": str(folder), "model.text.tokenizer_path":
                                                      str(other), "data.val": None}))

    run_dir = tmp_path / "fitted"  # a smaller vocabulary fitted here: other ids
    with pytest.raises(WarmStartError, match=rf"the one fitted here numbers tokens differently.*Set "
                                             rf"model.text.tokenizer_path to the source's tokenizer "
                                             rf"\({ckpt.parent.parent / 'tokenizer'} holds it\)"):
        build_run(tiny_config(run_dir, **{"model.init_from": str(ckpt), "model.text.vocab_size": 300,
                                          "data.val": None}))
    assert not (run_dir / "tokenizer").exists()  # removed: the rerun with tokenizer_path starts clean
    run = build_run(tiny_config(run_dir, **{"model.init_from": str(ckpt), "model.text.vocab_size": 300,
                                            "model.text.tokenizer_path": str(ckpt.parent.parent / "tokenizer"),
                                            "data.val": None}))
    assert run.tokenizer.vocab_size == read_checkpoint(ckpt).tokenizer.vocab_size


@pytest.mark.parametrize("change", [{"norm_first": True}, {"relative_position": "alibi"}, {"heads": 2}])
def test_a_source_that_computes_otherwise_with_the_same_shapes_is_refused(ckpt: Path, change):
    """A post-LN checkpoint loaded into a pre-LN model loads every tensor (same shapes) and computes something
    else; it was accepted without a word. (geglu and swiglu, the other such pair, are checked alike.)"""
    contents = read_checkpoint(ckpt)
    key, value = next(iter(change.items()))
    with pytest.raises(WarmStartError, match=rf"its encoder computes differently with the same tensor shapes "
                                             rf"\({key} is {getattr(contents.config.model.encoder, key)!r} there but "
                                             rf"{value!r} here\)"):
        _model(contents, init_from=str(ckpt), **change)


def test_renumbering_by_modality_leaves_a_width_mismatch_to_the_shape_check():
    """A source of another width and another modality order crashed in the row copy with a bare RuntimeError."""
    from mmm.warm_start import by_modality

    src = {"modality_embed.weight": torch.randn(2, 32)}
    own = {"modality_embed.weight": torch.zeros(2, 64)}
    out = by_modality(src, ["text", "dna"], ["dna", "text"], own)
    assert out["modality_embed.weight"].shape == (2, 32)  # as given: the shape check then names both shapes


def test_a_source_segment_table_the_model_lacks_keeps_its_row_0(ckpt: Path, tmp_path: Path, capsys):
    """An HF BERT (or a run) with segment embeddings warm-starting a model without them: the table was 'ignored'
    and its row 0 lost, so the model no longer computed the source's function on single texts."""
    from mmm.core.packing import PackedSeqInfo

    contents = read_checkpoint(ckpt)
    cfg = contents.config.model
    src_model = _model(contents)
    emb = src_model.embedders["text"]
    seg = EMBEDDERS.create("text", vocab_size=emb.vocab_size, dim=cfg.encoder.dim, max_len=cfg.text.max_len,
                           dropout=0.0, pad_id=0, segments=2, sep_id=3)
    seg.load_state_dict(emb.state_dict(), strict=False)
    with torch.no_grad():
        seg.segments.weight.normal_(0, 1.0)
    folder = tmp_path / "enc"
    save_encoder(load_encoder(ckpt), folder)
    enc = load_encoder(folder)
    enc.embedder = seg
    enc.config.text.segments = 2
    save_encoder(enc, folder)
    model = _model(contents)
    report = warm_start(model, folder)
    assert "embedders.text.segments.weight" in report.ignored
    assert "row 0 is added to embedders.text.tokens.weight" in capsys.readouterr().out
    ids = torch.tensor([2, 10, 11, 12, 3, 2, 40, 3])  # two single texts
    seq = PackedSeqInfo.from_seqlens([5, 3])
    seg.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(model.embedders["text"](ids, seq.position_ids), seg(ids, seq.position_ids), atol=1e-6)


def test_a_segment_table_the_source_lacks_starts_at_zero(ckpt: Path, capsys):
    """It kept its random N(0, 0.02) draw: every token moved from what the source computed at step 0."""
    from mmm.core.packing import PackedSeqInfo

    contents = read_checkpoint(ckpt)
    cfg = contents.config.model
    source = _model(contents, init_from=str(ckpt))
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, segments=2))
    vocab = contents.state_dict["embedders.text.tokens.weight"].shape[0]
    emb = EMBEDDERS.create("text", vocab_size=vocab, dim=cfg.encoder.dim, max_len=cfg.text.max_len,
                           dropout=cfg.encoder.dropout, pad_id=0, segments=2, sep_id=3)
    model = build_model(cfg, contents.config.objectives, {"text": emb})
    report = warm_start(model, ckpt)
    assert "embedders.text.segments.weight" in report.initialised
    assert torch.equal(model.embedders["text"].segments.weight, torch.zeros(2, cfg.encoder.dim))
    assert "it starts at zero" in capsys.readouterr().out
    ids, seq = torch.tensor([2, 10, 3, 11, 12, 3]), PackedSeqInfo.from_seqlens([6])  # a pair
    model.eval(), source.eval()
    with torch.no_grad():
        assert torch.allclose(model.embedders["text"](ids, seq.position_ids), source.embedders["text"](ids, seq.position_ids))
