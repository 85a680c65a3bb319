"""Causal language modeling (and MEAP) on the shared encoder: the mechanics.

Targets are the next original token within each packed sequence (never across a boundary), the
CLM pass is causal while the MLM pass of the same model stays bidirectional, the loss is the
cross-entropy over those targets, MEAP keeps the masker's corruption in the input, and a shared
LM head is one module under both objectives.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmm.batch import pack_masked
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.core.packing import PackedSeqInfo
from mmm.masking.base import MaskedTokens
from mmm.model import build_model
from mmm.objectives.clm import next_token_positions
from mmm.registry import EMBEDDERS, OBJECTIVES

V, D, MASK = 40, 32, 3


def _model(*objectives, attention="math"):
    torch.manual_seed(0)
    enc = EncoderConfig(dim=D, depth=2, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention=attention)
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0)
    return build_model(ModelConfig(encoder=enc), list(objectives), {"text": emb})


def _batch():
    """Two sequences (originals [1, 11, 12, 9, 2] and [1, 13, 8, 2]); three tokens masked with id 3."""
    a = MaskedTokens(np.array([1, MASK, MASK, 9, 2]), np.array([1, 2]), np.array([11, 12]))
    b = MaskedTokens(np.array([1, MASK, 8, 2]), np.array([1]), np.array([13]))
    return pack_masked([a, b])


def test_next_token_positions_stop_at_every_sequence_end():
    seq = PackedSeqInfo.from_seqlens([3, 1, 2])
    assert next_token_positions(seq).tolist() == [0, 1, 4]


def test_targets_are_the_next_original_token_within_each_sequence():
    assert "clm" in OBJECTIVES.list()
    model, batch = _model(ObjectiveConfig("clm")), _batch()
    prepared = model.objectives["clm"].prepare(batch)
    assert prepared.inputs["text"].ids.tolist() == [1, 11, 12, 9, 2, 1, 13, 8, 2]  # the masking is undone
    t = prepared.targets["text_next"]
    assert t.positions.tolist() == [0, 1, 2, 3, 5, 6, 7]  # the last token of a sequence predicts nothing
    assert t.labels.tolist() == [11, 12, 9, 2, 13, 8, 2]  # position 4 ([SEP] of the first) would see the next sequence
    assert batch.inputs["text"].ids.tolist()[1] == MASK  # the input batch is left as it was


def test_meap_keeps_the_maskers_corruption_in_the_input_and_predicts_originals():
    model, batch = _model(ObjectiveConfig("clm", args={"meap": True})), _batch()
    prepared = model.objectives["clm"].prepare(batch)
    assert prepared.inputs["text"].ids.tolist() == [1, MASK, MASK, 9, 2, 1, MASK, 8, 2]
    assert prepared.targets["text_next"].labels.tolist() == [11, 12, 9, 2, 13, 8, 2]


def test_loss_is_the_cross_entropy_of_the_next_tokens():
    model, batch = _model(ObjectiveConfig("clm")), _batch()
    model.eval()
    loss, outputs = model(batch)
    head = model.objectives["clm"]
    prepared = head.prepare(batch)
    hidden = model.encode(prepared, causal=True)
    t = prepared.targets["text_next"]
    want = F.cross_entropy(head.head(hidden[t.positions]), t.labels)
    assert torch.allclose(loss, want, atol=1e-6) and outputs["clm"].count == 7


def _encoder_outputs(model, batch, heads):
    seen = []
    hook = model.encoder.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    try:
        model(batch, heads=heads)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_the_clm_pass_is_causal_and_the_mlm_pass_is_not(attention):
    model = _model(ObjectiveConfig("mlm"), ObjectiveConfig("clm"), attention=attention)
    model.eval()
    batch = _batch()
    changed = _batch()
    changed.inputs["text"].ids[3] = 30  # a later token of the first sequence (position 3)
    (clm_a,), (clm_b,) = _encoder_outputs(model, batch, ["clm"]), _encoder_outputs(model, changed, ["clm"])
    assert torch.allclose(clm_a[:3], clm_b[:3], atol=1e-6)  # earlier positions cannot see it
    assert not torch.allclose(clm_a[3], clm_b[3])
    assert torch.allclose(clm_a[5:], clm_b[5:], atol=1e-6)  # nor can the other sequence
    (mlm_a,), (mlm_b,) = _encoder_outputs(model, batch, ["mlm"]), _encoder_outputs(model, changed, ["mlm"])
    assert not torch.allclose(mlm_a[:3], mlm_b[:3])  # the MLM pass is bidirectional
    assert torch.allclose(mlm_a[5:], mlm_b[5:], atol=1e-6)
    assert len(_encoder_outputs(model, batch, None)) == 2  # both heads: one pass each


def test_both_heads_in_one_step_equal_each_head_alone():
    model = _model(ObjectiveConfig("mlm"), ObjectiveConfig("clm", weight=0.5))
    model.eval()
    batch = _batch()
    total, outputs = model(batch)
    mlm, _ = model(batch, heads=["mlm"])
    clm, _ = model(batch, heads=["clm"])  # the weighted loss: 0.5 x the head's
    assert torch.allclose(outputs["mlm"].loss, mlm) and torch.allclose(0.5 * outputs["clm"].loss, clm)
    assert torch.allclose(total, mlm + clm)


def test_a_shared_head_is_one_module_trained_by_both_objectives():
    model = _model(ObjectiveConfig("mlm"), ObjectiveConfig("clm", args={"share_head": "mlm"}))
    assert model.objectives["clm"].head is model.objectives["mlm"].head
    dense = model.objectives["mlm"].head.dense.weight
    _, outputs = model(_batch(), heads=["clm"])
    outputs["clm"].loss.backward()
    assert dense.grad is not None and dense.grad.abs().sum() > 0
    own = _model(ObjectiveConfig("mlm"), ObjectiveConfig("clm"))
    assert sum(p.numel() for p in own.parameters()) - sum(p.numel() for p in model.parameters()) == D * D + 3 * D + V


def test_share_head_must_name_an_mlm_head():
    with pytest.raises(ValueError, match="share_head 'mlm' must name an mlm objective"):
        _model(ObjectiveConfig("clm", args={"share_head": "mlm"}))
    with pytest.raises(ValueError, match="share_head 'rts' must name an mlm objective"):
        _model(ObjectiveConfig("rts"), ObjectiveConfig("clm", args={"share_head": "rts"}))


def test_one_token_sequences_give_a_zero_loss_connected_to_the_graph():
    model = _model(ObjectiveConfig("clm"))
    batch = pack_masked([MaskedTokens(np.array([1]), np.array([], dtype=np.int64), np.array([], dtype=np.int64))])
    loss, outputs = model(batch)
    assert float(loss.detach()) == 0.0 and outputs["clm"].count == 0
    loss.backward()
