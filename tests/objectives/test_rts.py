"""Random token substitution (RTS) and swapped language modeling (SLM): the mechanics.

The substitution is the bert_random masker at mask/random/keep = 0/1/0 (no [MASK] ever written),
the RTS labels are "input differs from the original" over every token (a draw equal to the
original counts as original), the loss is the binary cross-entropy over all tokens, and the head
learns to detect substitutes. SLM is that masker with the MLM head: targets at every swapped token.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmm.batch import pack_masked
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.masking.base import MaskedTokens, TokenVocab
from mmm.model import build_model
from mmm.objectives.rts import substituted
from mmm.registry import EMBEDDERS, MASKERS, OBJECTIVES

V, D = 40, 32
VOCAB = TokenVocab(size=V, mask_id=3, special_ids=frozenset({0, 1, 2, 3}))


def _model(seed=0):
    torch.manual_seed(seed)
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=32, dropout=0.0, pad_id=0)
    return build_model(ModelConfig(encoder=enc), [ObjectiveConfig("rts")], {"text": emb})


def _swap_masker(ratio=0.3):
    return MASKERS.create("bert_random", ratio=ratio, mask_prob=0.0, random_prob=1.0, vocab=VOCAB)


def _sequence(rng, n=20):
    ids = np.concatenate([[1], rng.integers(4, V, size=n - 2), [2]])
    word_ids = np.concatenate([[-1], np.arange(n - 2), [-1]])
    return ids, word_ids


def test_the_swap_recipe_writes_no_mask_token_and_replaces_every_chosen_token():
    rng = np.random.default_rng(0)
    masker = _swap_masker()
    for _ in range(20):
        ids, word_ids = _sequence(rng)
        out = masker(ids, word_ids, rng)
        assert (out.input_ids != VOCAB.mask_id).all()
        assert out.positions.size == round(0.3 * 18)
        assert np.isin(out.input_ids[out.positions], np.arange(4, V)).all()  # never a special token
        rest = np.setdiff1d(np.arange(ids.size), out.positions)
        assert np.array_equal(out.input_ids[rest], ids[rest])


def test_a_draw_equal_to_the_original_counts_as_original():
    ids = torch.tensor([1, 20, 7, 30, 2])
    positions, labels = torch.tensor([1, 3]), torch.tensor([5, 30])  # position 3 drew its own id back
    assert substituted(ids, positions, labels).tolist() == [False, True, False, False, False]


def test_loss_is_the_binary_cross_entropy_over_every_token():
    assert "rts" in OBJECTIVES.list()
    model = _model()
    model.eval()
    a = MaskedTokens(np.array([1, 20, 7, 30, 2]), np.array([1, 3]), np.array([5, 30]))
    b = MaskedTokens(np.array([1, 9, 2]), np.array([1]), np.array([11]))
    batch = pack_masked([a, b])
    loss, outputs = model(batch)
    head = model.objectives["rts"]
    logits = head.head(model.encode(batch)).squeeze(-1)
    target = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.float)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, target), atol=1e-6)
    assert outputs["rts"].count == 8 and float(outputs["rts"].metrics["replaced"]) == pytest.approx(2 / 8)


def test_the_head_learns_to_detect_substitutes():
    model = _model()
    masker, rng = _swap_masker(0.2), np.random.default_rng(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # "natural" text uses tokens 4..9 only; substitutes are drawn from the whole vocabulary (4..39)
    seqs = [(np.array([1, *rng.integers(4, 10, size=18), 2]), np.array([-1, *range(18), -1]))
            for _ in range(16)]
    for _ in range(40):
        batch = pack_masked([masker(ids, w, rng) for ids, w in seqs])
        loss, outputs = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch = pack_masked([masker(ids, w, rng) for ids, w in seqs])
    _, outputs = model(batch)
    # a head at the prior says "original" everywhere (accuracy 0.8, recall 0); 30 of 36 substitutes are detectable
    assert float(outputs["rts"].metrics["recall"]) > 0.6 and float(outputs["rts"].metrics["acc"]) > 0.9


def test_slm_is_mlm_over_the_swapped_tokens():
    torch.manual_seed(0)
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=32, dropout=0.0, pad_id=0)
    model = build_model(ModelConfig(encoder=enc), [ObjectiveConfig("mlm")], {"text": emb})
    rng = np.random.default_rng(0)
    ids, word_ids = _sequence(rng)
    out = _swap_masker()(ids, word_ids, rng)
    batch = pack_masked([out])
    _, outputs = model(batch)
    assert outputs["mlm"].count == out.positions.size  # every swapped token is predicted
    assert torch.equal(batch.targets["text"].labels, torch.from_numpy(ids[out.positions]))


def test_rts_refuses_a_modality_the_model_lacks():
    torch.manual_seed(0)
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64)
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=32, dropout=0.0, pad_id=0)
    with pytest.raises(ValueError, match="objective rts: modality 'dna' has no embedder"):
        build_model(ModelConfig(encoder=enc), [ObjectiveConfig("rts", args={"modality": "dna"})], {"text": emb})


def test_rts_refuses_a_modality_without_token_ids_when_the_model_is_built():
    """An image embedder has no token table: refused at build time, not by an AttributeError in the first forward."""
    enc = EncoderConfig(dim=D, depth=1, heads=2, mlp_hidden=64)
    emb = EMBEDDERS.create("image", dim=D, image_size=8, patch_size=4)
    with pytest.raises(ValueError, match="objective rts: the 'image' embedder has no token table"):
        build_model(ModelConfig(encoder=enc), [ObjectiveConfig("rts", args={"modality": "image"})], {"image": emb})


def test_a_run_whose_masker_writes_mask_tokens_is_refused_naming_the_field():
    """RTS's substitutes must be indistinguishable by form: BERT's 80% [MASK] would be a trivial cue."""
    from mmm.config import ConfigError, ComponentConfig, TaskConfig
    from mmm.train.tasks import check_masking_args

    def task(heads=("rts",), **args):
        return TaskConfig(name="", dataset="text", train="embedded", masking=ComponentConfig("bert_random", args),
                          objectives=list(heads))

    with pytest.raises(ConfigError, match=r"^masking: objective rts .* masking.args.mask_prob: 0 .* got mask_prob 0.8"):
        check_masking_args([task()], [ObjectiveConfig("rts")])
    check_masking_args([task(mask_prob=0.0, random_prob=1.0)], [ObjectiveConfig("rts")])
    check_masking_args([task(heads=["mlm"])], [ObjectiveConfig("mlm")])  # only the rts head asks
