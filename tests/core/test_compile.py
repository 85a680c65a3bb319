"""The encoder + MLM head compiles without graph breaks (forward and backward, dynamic shapes)."""
import pytest
import torch

from mmm.batch import PackedBatch, TokenInput, TokenTargets
from mmm.config import EncoderConfig
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import PackedSeqInfo
from mmm.objectives.mlm import MaskedLanguageModeling
from mmm.registry import EMBEDDERS

VOCAB = 50


class _TextMLM(torch.nn.Module):
    """Embedder → encoder → MLM objective, the text pretraining forward."""

    def __init__(self, causal=False, **encoder):
        super().__init__()
        self.causal = causal
        cfg = EncoderConfig(**{"dim": 32, "depth": 2, "heads": 4, "mlp_hidden": 64, "dropout": 0.1, "attn_dropout": 0.1,
                               **encoder})
        self.embed = EMBEDDERS.create("text", vocab_size=VOCAB, dim=32, max_len=64)
        self.encoder = TransformerEncoder(cfg)
        self.mlm = MaskedLanguageModeling(32, {"text": self.embed}, cfg)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        hidden = self.encoder(batch.inputs["text"].embed(self.embed), batch.seq, causal=self.causal)
        return self.mlm(hidden, batch).loss


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = PackedSeqInfo.from_seqlens(lengths)
    ids = torch.randint(0, VOCAB, (seq.num_tokens,), generator=g)
    positions = torch.randperm(seq.num_tokens, generator=g)[: max(1, seq.num_tokens // 5)]
    return PackedBatch(seq, {"text": TokenInput(ids, seq.position_ids)}, {"text": TokenTargets(positions, ids[positions])})


CASES = [(backend, rel) for backend in ("sdpa", "math") for rel in ("none", "alibi", "rotary")]
IDS = [f"{b}-{r}" for b, r in CASES]
FEW = [11, 9, 6, 3]
GROUPED = [13, 12, 10, 9, 7, 7, 5, 4, 3]  # ≥ 8 sequences: the sdpa backend pads them in length groups


def _check(backend, rel, lengths, dynamic_backward, causal=False):
    torch.manual_seed(0)
    model = _TextMLM(attention=backend, relative_position=rel, causal=causal).train()
    batch = _batch(lengths)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(assume_static_by_default=False):  # dynamic shapes, as trainer.compile uses
        explained = torch._dynamo.explain(model)(batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    # backward: AOTAutograd traces the joint graph; fullgraph=True fails on any break, forward or backward
    eager = _grads(model, batch, model)
    torch._dynamo.reset()
    compiled = _grads(model, batch, torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=dynamic_backward))
    assert len(eager) == len(compiled) == len(list(model.parameters()))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,rel", CASES, ids=IDS)
def test_encoder_and_mlm_head_have_no_graph_breaks(backend, rel):
    """Forward traced with dynamic shapes; forward + backward compiled as one graph (static shapes: 3x quicker)."""
    _check(backend, rel, FEW, dynamic_backward=False)


def test_length_grouped_sdpa_path_has_no_graph_breaks():
    _check("sdpa", "alibi", GROUPED, dynamic_backward=False)


@pytest.mark.parametrize("rel", ["none", "alibi"])
def test_causal_encoder_has_no_graph_breaks(rel):
    """encoder(..., causal=True): SDPA's is_causal path, and ALiBi's causal row blocks."""
    _check("sdpa", rel, FEW, dynamic_backward=False, causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [FEW, GROUPED], ids=["few", "grouped"])
@pytest.mark.parametrize("backend,rel", CASES, ids=IDS)
def test_backward_compiles_with_dynamic_shapes(backend, rel, lengths):
    _check(backend, rel, lengths, dynamic_backward=True)


def _grads(model, batch, run):
    """Parameter gradients of one training-mode loss without dropout (eager and compiled see the same computation)."""
    model.zero_grad(set_to_none=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for blk in model.encoder.blocks:
        blk.attn.attn_dropout = 0.0
    run(batch).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return grads


@pytest.mark.gpu
@pytest.mark.parametrize("backend,rel", [("xformers", "none"), ("sdpa", "none"), ("sdpa", "alibi"), ("sdpa", "rotary"),
                                         ("flex", "alibi")],
                         ids=["xformers", "sdpa", "sdpa-alibi", "sdpa-rotary", "flex-alibi"])
def test_gpu_step_has_no_host_sync_and_compiles_without_breaks(backend, rel):
    """Once the batch is on the GPU, forward + backward never waits for the device; the forward traces whole."""
    if backend == "xformers":
        pytest.importorskip("xformers")
    torch.manual_seed(0)
    extra = {"attn_dropout": 0.0} if backend == "flex" else {}
    model = _TextMLM(attention=backend, relative_position=rel, **extra).cuda().train()
    assert model.encoder.backend_for(torch.device("cuda")) == backend
    batch = _batch(GROUPED).pin_memory().to("cuda")
    model(batch).backward()  # warm-up outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(batch)
    assert explained.graph_break_count == 0, explained.break_reasons

