"""MosaicBERT's final-layer subset in pretraining (``encoder.final_layer_subset``): the last block runs
at the rows the heads read (MLM's masked positions) and the loss and every gradient are those of the
full pass; passes whose heads do not name their rows run the last block in full."""
import dataclasses

import numpy as np
import pytest
import torch

from mmm.batch import TokenTargets, pack_masked
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.masking.base import MaskedTokens
from mmm.model import build_model
from mmm.registry import EMBEDDERS

V, D = 40, 32


def _model(subset, objectives=(ObjectiveConfig("mlm"),), **enc_kw):
    torch.manual_seed(0)
    enc = EncoderConfig(**{**dict(dim=D, depth=2, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0,
                                  attention="sdpa", final_layer_subset=subset), **enc_kw})
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=128, dropout=0.0, pad_id=0)
    return build_model(ModelConfig(encoder=enc), list(objectives), {"text": emb})


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for n in (70, 9, 120, 33, 95, 5, 60, 14, 110, 41, 8, 88, 25, 64, 3, 100, 17, 50, 77, 12, 30, 6):  # packed longest first
        ids = rng.integers(3, V, n)
        pos = np.sort(rng.choice(np.arange(1, n), size=max(1, n // 4), replace=False))
        samples.append(MaskedTokens(ids, pos, rng.integers(3, V, len(pos))))
    return pack_masked(samples)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = model(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("enc_kw", [{}, {"relative_position": "alibi"}, {"relative_position": "rotary"},
                                    {"norm_first": True, "final_norm": True}, {"attention": "math"}])
def test_the_subset_gives_the_full_loss_and_gradients(enc_kw, monkeypatch):
    batch = _batch()
    assert batch.seq.pad_groups  # packed longest first, attended in length groups (reordering: tests/core)
    full, sub = _model(False, **enc_kw), _model(True, **enc_kw)
    rows = sub.output_rows(batch)
    assert full.output_rows(batch) is None
    assert rows is not None and rows.index.tolist() == batch.targets["text"].positions.tolist()
    seen = []
    mlp = type(sub.encoder.blocks[-1].mlp)
    monkeypatch.setattr(mlp, "forward", lambda self, h, _f=mlp.forward: (seen.append(h.shape[0]), _f(self, h))[1])
    (lf, gf), (ls, gs) = _loss_and_grads(full, batch), _loss_and_grads(sub, batch)
    n, m = batch.num_tokens, len(rows)
    assert seen == [n, n, n, m]  # full: every block at N rows; subset: the last at the M masked rows
    torch.testing.assert_close(ls, lf, atol=1e-6, rtol=1e-6)
    assert gs.keys() == gf.keys()
    for name in gf:
        torch.testing.assert_close(gs[name], gf[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_rows_of_several_heads_are_joined():
    """MLM and a token-target head (HuBERT / BEiT style) on the text stream: the last block runs at the union
    of their rows; loss and gradients equal the full pass's."""
    heads = (ObjectiveConfig("mlm"), ObjectiveConfig("token_targets", args={"target": "units", "num_classes": 7}))
    batch = _batch()
    n = batch.num_tokens
    units = torch.arange(3, n, 11)  # other rows than the masked ones, some shared
    batch.targets["units"] = TokenTargets(units, units % 7)
    full, sub = _model(False, objectives=heads), _model(True, objectives=heads)
    rows = sub.output_rows(batch)
    want = torch.unique(torch.cat([batch.targets["text"].positions, units]))
    assert rows is not None and rows.index.tolist() == want.tolist()
    (lf, gf), (ls, gs) = _loss_and_grads(full, batch), _loss_and_grads(sub, batch)
    torch.testing.assert_close(ls, lf, atol=1e-6, rtol=1e-6)
    for name in gf:
        torch.testing.assert_close(gs[name], gf[name], atol=1e-6, rtol=1e-5, msg=name)


def test_heads_that_do_not_name_their_rows_keep_the_full_pass():
    batch = _batch()
    assert _model(True, objectives=(ObjectiveConfig("mlm", args={"decoder_layers": 1}),)).output_rows(batch) is None
    assert _model(True, mto_layers=1).output_rows(batch) is None
    model = _model(True)
    assert model.output_rows(dataclasses.replace(batch, partners=torch.full((batch.num_sequences,), -1))) is None
    empty = dataclasses.replace(batch, targets={})
    assert model.output_rows(empty) is None  # nothing is read: the full pass (the head's zero loss keeps its graph)
    loss, _ = model(empty)
    assert float(loss.detach()) == 0.0


def test_a_causal_head_runs_its_own_full_pass_and_leaves_the_subset_to_the_others():
    model = _model(True, objectives=(ObjectiveConfig("mlm"), ObjectiveConfig("clm")))
    full = _model(False, objectives=(ObjectiveConfig("mlm"), ObjectiveConfig("clm")))
    batch = _batch()
    rows = model.output_rows(batch)  # the CLM head reads its causal pass, which never takes the subset
    assert rows is not None and rows.index.tolist() == batch.targets["text"].positions.tolist()
    (lf, gf), (ls, gs) = _loss_and_grads(full, batch), _loss_and_grads(model, batch)
    torch.testing.assert_close(ls, lf, atol=1e-6, rtol=1e-6)
    for name in gf:
        torch.testing.assert_close(gs[name], gf[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_training_module_asks_for_the_current_phases_heads_only():
    from types import SimpleNamespace

    from mmm.config import OptimConfig
    from mmm.train.module import MaskedModelingModule
    from mmm.train.phases import PhaseSchedule

    model = _model(True, objectives=(ObjectiveConfig("mlm"), ObjectiveConfig("electra", args={"generator_depth": 1})))
    batch = _batch()
    assert model.output_rows(batch) is None  # ELECTRA reads every token
    module = MaskedModelingModule(model, OptimConfig(), max_steps=10,
                                  phases=PhaseSchedule(heads=(("mlm",), ("mlm", "electra")), ends=(5, 10)))
    assert module._transfer_heads(batch) is None  # no trainer: every head
    module._trainer = SimpleNamespace(training=True, global_step=0)
    assert module._transfer_heads(batch) == ["mlm"]  # global step 0: the MLM phase
    assert model.output_rows(batch, module._transfer_heads(batch)) is not None
    module._trainer = SimpleNamespace(training=True, global_step=6)
    assert module._transfer_heads(batch) == ["mlm", "electra"]
    assert model.output_rows(batch, module._transfer_heads(batch)) is None


def test_rows_found_before_the_move_are_used_and_carried():
    model = _model(True)
    batch = _batch()
    rows = model.output_rows(batch)
    carried = dataclasses.replace(batch, output_rows=rows).to("cpu")
    assert carried.output_rows is not None and torch.equal(carried.output_rows.index, rows.index)
    loss_carried, _ = model(carried)
    loss, _ = model(batch)
    torch.testing.assert_close(loss_carried, loss)
    with pytest.raises(ValueError, match="bidirectional single-stream"):
        model.encode(batch, causal=True, rows=rows)


@pytest.mark.gpu
def test_the_training_module_finds_the_rows_on_the_host_before_the_move():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from mmm.config import OptimConfig
    from mmm.train.module import MaskedModelingModule

    model = _model(True).cuda()
    module = MaskedModelingModule(model, OptimConfig(), max_steps=1)
    batch = _batch()
    moved = module.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    assert moved.output_rows is not None and moved.output_rows.index.device.type == "cuda"
    loss, _ = model(moved)
    full = _model(False).cuda()
    torch.testing.assert_close(loss, full(batch.to("cuda"))[0], atol=1e-5, rtol=1e-5)
