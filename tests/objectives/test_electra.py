"""ELECTRA replaced-token detection and DeBERTaV3 embedding sharing: the mechanics.

Sampling happens inside the step (a different generator gives a different corruption), the
labels are right (a sample equal to the original is not a replacement), the gradients of the
two losses reach the tables each sharing mode says they reach, and only the discriminator is an
encoder (what load_encoder returns and what exports to HF).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from mmm.batch import pack_masked
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.masking.base import MaskedTokens
from mmm.model import build_model
from mmm.objectives.electra import GDESEmbedding, generator_encoder_config, sample_tokens
from mmm.registry import EMBEDDERS, OBJECTIVES

V, D = 40, 32


def _model(sharing="shared", size=0.5, seed=0):
    torch.manual_seed(seed)
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0)
    obj = ObjectiveConfig("electra", args={"generator_size": size, "embedding_sharing": sharing})
    return build_model(ModelConfig(encoder=enc), [obj], {"text": emb})


def _batch():
    """Two sequences; positions 1, 2 of the first and 1 of the second are masked (id 3 = [MASK])."""
    a = MaskedTokens(np.array([1, 3, 3, 9, 2]), np.array([1, 2]), np.array([11, 12]))
    b = MaskedTokens(np.array([1, 3, 8, 2]), np.array([1]), np.array([13]))
    return pack_masked([a, b])


def _force(model, token: int) -> None:
    """Make the generator put (almost) all its probability on ``token``."""
    with torch.no_grad():
        model.objectives["electra"].generator_head.bias.zero_()
        model.objectives["electra"].generator_head.bias[token] = 1e4


def test_registered_and_generator_is_a_fraction_of_the_width():
    assert "electra" in OBJECTIVES.list()
    cfg = generator_encoder_config(EncoderConfig(dim=256, heads=4, mlp_hidden=1024, depth=4), 0.25, None)
    assert (cfg.dim, cfg.heads, cfg.mlp_hidden, cfg.depth) == (64, 1, 256, 4)
    cfg = generator_encoder_config(EncoderConfig(dim=768, heads=12, depth=12), 1 / 3, 2)
    assert (cfg.dim, cfg.heads, cfg.mlp_hidden, cfg.depth) == (256, 4, None, 2)
    model = _model(size=0.5)
    assert model.objectives["electra"].generator_dim == D // 2


def test_sampling_happens_in_the_step_with_the_current_generator():
    model, batch = _model(), _batch()
    positions = batch.targets["text"].positions
    _force(model, 20)
    first = model.objectives["electra"].prepare(batch)
    assert torch.equal(first.inputs["text"].ids[positions], torch.full((3,), 20))
    _force(model, 21)  # the same batch, a changed generator: a different corruption
    second = model.objectives["electra"].prepare(batch)
    assert torch.equal(second.inputs["text"].ids[positions], torch.full((3,), 21))
    # unmasked tokens are left alone, and the input batch itself is not modified
    keep = torch.ones(batch.num_tokens, dtype=torch.bool)
    keep[positions] = False
    assert torch.equal(second.inputs["text"].ids[keep], batch.inputs["text"].ids[keep])
    assert torch.equal(batch.inputs["text"].ids[positions], torch.full((3,), 3))


def test_samples_are_drawn_from_the_generator_distribution():
    model, batch = _model(), _batch()
    with torch.no_grad():  # two equally likely tokens: both must show up over repeated steps
        head = model.objectives["electra"].generator_head
        head.bias.zero_()
        head.bias[[20, 30]] = 1e4
    torch.manual_seed(1)
    seen = set()
    for _ in range(20):
        out = model.objectives["electra"].prepare(batch)
        seen |= set(out.inputs["text"].ids[batch.targets["text"].positions].tolist())
    assert seen == {20, 30}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_frequencies_match_the_softmax(temperature):
    # 40,000 draws from each of two rows; every token's count within 5 standard deviations of n p,
    # and a token of probability 0 (logit -inf) never drawn
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, float("-inf"), 0.5, -3.0, 1.5],
                           [float("-inf"), -2.0, 3.0, 0.0, 0.0, float("-inf"), 1.0, -0.5]])
    n = 40_000
    torch.manual_seed(0)
    drawn = sample_tokens(logits.repeat_interleave(n, 0), temperature).view(2, n)
    p = torch.softmax(logits / temperature, -1).double()  # (2, V)
    counts = torch.stack([torch.bincount(row, minlength=logits.shape[1]) for row in drawn]).double()
    sd = (n * p * (1 - p)).sqrt()
    assert torch.all((counts - n * p).abs() <= 5 * sd + 1e-9), (counts, n * p)
    assert counts[p == 0].sum() == 0
    assert drawn.dtype == torch.int64


def test_sampling_follows_the_global_seed_and_each_rows_own_logits():
    logits = torch.randn(64, 4101, generator=torch.Generator().manual_seed(3))
    logits[torch.arange(64), torch.arange(64) * 50] = 1e4  # row i: token 50 i, all but surely
    torch.manual_seed(5)
    a = sample_tokens(logits)
    torch.manual_seed(5)
    b = sample_tokens(logits)
    assert torch.equal(a, b)
    assert torch.equal(a, torch.arange(64) * 50)


def test_labels_count_a_sample_equal_to_the_original_as_original():
    model, batch = _model(), _batch()
    _force(model, 12)  # the original token at the second masked position
    out = model.objectives["electra"].prepare(batch)
    replaced = out.targets["text_replaced"].replaced
    expected = torch.zeros(batch.num_tokens, dtype=torch.bool)
    t = batch.targets["text"]
    expected[t.positions] = t.labels != 12
    assert torch.equal(replaced, expected)
    assert int(replaced.sum()) == 2  # the masked tokens whose original is not 12


def test_full_forward_loss_is_generator_plus_weighted_rtd():
    model, batch = _model(), _batch()
    model.eval()
    loss, outputs = model(batch)
    m = outputs["electra"].metrics
    assert torch.allclose(loss, m["generator_loss"] + 50.0 * m["rtd_loss"], rtol=1e-5)
    assert outputs["electra"].count == batch.num_tokens
    assert set(m) == {"generator_loss", "rtd_loss", "generator_acc", "rtd_acc", "replaced"}


def _grads(model, which: str):
    """Gradients of the generator MLM loss or of the RTD loss alone (one forward each)."""
    model.zero_grad(set_to_none=True)
    head = model.objectives["electra"]
    batch = head.prepare(_batch())
    if which == "generator":
        batch.targets["text_replaced"].generator_loss.backward()
    else:
        rtd, _ = head.rtd_loss(model.encode(batch), batch.targets["text_replaced"].replaced)
        rtd.backward()
    return head


def _nonzero(p) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_gdes_rtd_loss_does_not_reach_the_generator_table():
    model = _model("gdes")
    disc_tokens = model.embedders["text"].tokens
    assert isinstance(disc_tokens, GDESEmbedding)
    head = _grads(model, "rtd")
    assert not _nonzero(head.generator_embedder.tokens.weight)  # stop-gradient
    assert _nonzero(head.embedding_residual)  # the residual takes the RTD gradient
    assert not any(_nonzero(p) for p in head.generator.parameters())  # nothing flows back through sampling
    head = _grads(model, "generator")
    assert _nonzero(head.generator_embedder.tokens.weight)
    assert not _nonzero(head.embedding_residual)


def test_gdes_residual_starts_at_zero_and_the_table_is_the_generators_plus_residual():
    model = _model("gdes")
    head = model.objectives["electra"]
    assert float(head.embedding_residual.detach().abs().sum()) == 0.0
    with torch.no_grad():
        head.embedding_residual.add_(0.5)
    state = model.state_dict()
    assert torch.equal(state["embedders.text.tokens.weight"], head.generator_embedder.tokens.weight + 0.5)
    # a resume loads the same state back exactly (the residual's own entry wins)
    fresh = _model("gdes", seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.objectives["electra"].embedding_residual, head.embedding_residual)
    assert torch.equal(fresh.embedders["text"].tokens.weight, model.embedders["text"].tokens.weight)


def test_shared_rtd_loss_reaches_the_one_table():
    model = _model("shared")
    head = model.objectives["electra"]
    assert head.generator_embedder.tokens is model.embedders["text"].tokens
    head = _grads(model, "rtd")
    assert _nonzero(model.embedders["text"].tokens.weight)
    assert not any(_nonzero(p) for p in head.generator.parameters())


def test_none_keeps_separate_tables():
    model = _model("none")
    head = model.objectives["electra"]
    gen, disc = head.generator_embedder.tokens, model.embedders["text"].tokens
    assert gen is not disc and gen.embedding_dim == D // 2 and disc.embedding_dim == D
    head = _grads(model, "rtd")
    assert _nonzero(disc.weight) and not _nonzero(gen.weight)
    head = _grads(model, "generator")
    assert _nonzero(gen.weight) and not _nonzero(disc.weight)


def test_a_batch_without_masked_tokens_detects_nothing_replaced():
    model = _model()
    batch = pack_masked([MaskedTokens(np.array([1, 5, 6, 2]), np.array([], dtype=np.int64), np.array([], dtype=np.int64))])
    loss, outputs = model(batch)
    assert outputs["electra"].metrics["replaced"] == 0
    loss.backward()  # connected to the graph
    assert torch.isfinite(loss)


@pytest.mark.parametrize("sharing", ["shared", "gdes"])
def test_pretrain_loads_and_exports_only_the_discriminator(tmp_path: Path, sharing: str):
    from conftest import REPO, TINY_OVERRIDES

    from mmm.config import load_config
    from mmm.encoders import load_encoder, read_checkpoint
    from mmm.interop.hf import export_hf_bert
    from mmm.train.pretrain import pretrain

    cfg = load_config(REPO / "configs" / "text_electra_tiny.yaml", {
        **TINY_OVERRIDES, "trainer.default_root_dir": str(tmp_path / "run"), "trainer.max_steps": 2,
        "data.val": None, "objectives.0.args.embedding_sharing": sharing})
    run = pretrain(cfg)
    contents = read_checkpoint(run.last_checkpoint)
    state = contents.state_dict
    assert any(k.startswith("objectives.electra.generator.") for k in state)  # trained, and saved for resume
    enc = load_encoder(run.last_checkpoint)
    own = enc.state_dict()
    assert not any("generator" in k for k in own)
    assert enc.hidden_size == 64 and own["embedder.tokens.weight"].shape[1] == 64
    table = state["embedders.text.tokens.weight"]
    if sharing == "gdes":
        gen = state["objectives.electra.generator_embedder.tokens.weight"]
        assert torch.allclose(table, gen + state["objectives.electra.embedding_residual"])
    assert torch.equal(own["embedder.tokens.weight"], table)
    for k, v in own.items():
        if k.startswith("encoder."):
            assert torch.equal(v, state[k]), k

    pytest.importorskip("transformers")
    import json

    from safetensors.torch import load_file

    out = export_hf_bert(run.last_checkpoint, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    tensors = load_file(str(out / "model.safetensors"))
    assert torch.equal(tensors["embeddings.word_embeddings.weight"], table)
    assert not any("generator" in k for k in tensors)


def test_dna_tokens_work_the_same_way():
    torch.manual_seed(0)
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0)
    model = build_model(ModelConfig(encoder=enc), [ObjectiveConfig("electra", args={"modality": "dna"})], {"dna": emb})
    batch = pack_masked([MaskedTokens(np.array([1, 3, 3, 9, 2]), np.array([1, 2]), np.array([11, 12]))], modality="dna")
    _force_head = model.objectives["electra"].generator_head
    with torch.no_grad():
        _force_head.bias[20] = 1e4
    loss, outputs = model(batch)
    assert outputs["electra"].metrics["replaced"] == pytest.approx(2 / 5)
    loss.backward()
    assert model.embedders["dna"].tokens.weight.grad is not None



def test_shared_embeddings_are_the_whole_embedding_layer_as_in_electra():
    """ELECTRA Sec. 3.2 shares the token and positional embeddings (its code: the embedding LayerNorm too);
    the generator's MLM loss then trains the discriminator's position table as well."""
    model = _model("shared")
    gen, disc = model.objectives["electra"].generator_embedder, model.embedders["text"]
    assert gen.tokens is disc.tokens and gen.positions is disc.positions and gen.norm is disc.norm
    _grads(model, "generator")
    assert _nonzero(next(disc.positions.parameters())) and _nonzero(disc.norm.weight)
    for sharing in ("gdes", "none"):  # DeBERTaV3 shares the token table only; none shares nothing
        model = _model(sharing)
        gen, disc = model.objectives["electra"].generator_embedder, model.embedders["text"]
        assert gen.positions is not disc.positions and gen.norm is not disc.norm


@pytest.mark.parametrize("sharing", ["shared", "gdes", "none"])
def test_the_generator_has_the_discriminator_s_segment_embeddings(sharing):
    """ELECTRA's code shares the token type table with the rest of the embeddings; without sharing the generator
    still gives a pair's second text its own segment."""
    torch.manual_seed(0)
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0, segments=2, sep_id=2)
    obj = ObjectiveConfig("electra", args={"generator_size": 0.5, "embedding_sharing": sharing})
    model = build_model(ModelConfig(encoder=enc), [obj], {"text": emb})
    gen, disc = model.objectives["electra"].generator_embedder, model.embedders["text"]
    assert gen.segments is not None and gen.sep_id == 2 and gen.segments.num_embeddings == 2
    assert (gen.segments is disc.segments) == (sharing == "shared")


def test_with_segments_the_generator_never_samples_sep():
    """A sampled [SEP] moved the rest of its sequence into segment 1: a cue for the discriminator, and row 1 trained
    on single texts."""
    torch.manual_seed(0)
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0, segments=2, sep_id=2)
    model = build_model(ModelConfig(encoder=enc), [ObjectiveConfig("electra", args={"generator_size": 0.5})],
                        {"text": emb})
    _force(model, 2)  # the generator puts (almost) all its probability on [SEP]
    out = model.objectives["electra"].prepare(_batch())
    assert not bool((out.inputs["text"].ids.index_select(0, _batch().targets["text"].positions) == 2).any())
    without = _model("shared")  # no segments: sampling is unchanged
    _force(without, 2)
    out = without.objectives["electra"].prepare(_batch())
    assert bool((out.inputs["text"].ids.index_select(0, _batch().targets["text"].positions) == 2).all())
