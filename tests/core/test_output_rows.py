"""The last block computed only at the rows a head reads (MosaicBERT's final-layer subset): the same
states and gradients as the full forward's rows, for every position scheme, norm placement and backend."""
import pytest
import torch

from mmm.config import EncoderConfig
from mmm.core.encoder import TransformerEncoder
from mmm.core.output_rows import OutputRows
from mmm.core.packing import PackedSeqInfo

LENGTHS = [70, 9, 120, 33, 95, 5, 60, 14, 110, 41, 8, 88, 25, 64, 1, 100, 17, 50, 77, 12, 30, 6]  # not longest first


def _encoder(**kw):
    base = dict(dim=32, depth=2, heads=4, mlp_hidden=48, dropout=0.0, attn_dropout=0.0, attention="sdpa")
    torch.manual_seed(0)
    return TransformerEncoder(EncoderConfig(**{**base, **kw}))


@pytest.mark.parametrize("kw", [
    {}, {"relative_position": "alibi"}, {"relative_position": "rotary"},
    {"norm_first": True, "final_norm": True}, {"norm_first": True, "relative_position": "alibi"},
    {"attention": "math"}, {"attention": "math", "relative_position": "rotary"}, {"mlp": "swiglu"},
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("which", ["first", "some"])
def test_rows_equal_the_full_forward_and_its_gradients(kw, causal, which):
    enc = _encoder(**kw)
    seq = PackedSeqInfo.from_seqlens(LENGTHS)
    assert seq.longest_first is not None  # the sdpa backend runs the first blocks on the reordered layout
    n = sum(LENGTHS)
    picked = [0, 5, 69, 70, 78, 79, 150, 199, 300, 301, 302, 700, 701, n - 1] if which == "some" else None
    rows = OutputRows.first_tokens(seq) if picked is None else OutputRows.of(seq, picked)
    x = torch.randn(n, 32, requires_grad=True)
    full = enc(x, seq, causal=causal).index_select(0, rows.index)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    assert rows.index.tolist() == (picked or starts)
    got = enc(x, seq, causal=causal, rows=rows)
    assert got.shape == (len(rows), 32)
    assert torch.allclose(got, full, atol=1e-5), (got - full).abs().max()
    w = torch.randn_like(got)
    gx_full, *gp_full = torch.autograd.grad((full * w).sum(), [x, *enc.parameters()], allow_unused=True)
    gx, *gp = torch.autograd.grad((got * w).sum(), [x, *enc.parameters()], allow_unused=True)
    assert torch.allclose(gx, gx_full, atol=1e-5)
    for a, b in zip(gp, gp_full):
        assert (a is None and (b is None or not b.abs().any())) or torch.allclose(a, b, atol=1e-5)


def test_the_rows_path_goes_through_the_last_blocks_call():
    """FSDP and compile wrap each block's ``forward``: the rows must reach the last block through it."""
    enc = _encoder()
    seq = PackedSeqInfo.from_seqlens(LENGTHS)
    calls = []
    enc.blocks[-1].register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("rows")), with_kwargs=True)
    rows = OutputRows.first_tokens(seq)
    enc(torch.randn(seq.num_tokens, 32), seq, rows=rows)
    assert calls == [rows]


def test_rows_with_modality_experts_and_a_uniform_batch():
    enc = _encoder()
    enc = TransformerEncoder(enc.cfg, experts=2)
    seq = PackedSeqInfo.from_seqlens([6, 6, 6])
    modality = torch.tensor([0] * 6 + [1] * 6 + [0] * 6)
    x = torch.randn(18, 32)
    rows = OutputRows.of(seq, [0, 3, 6, 13, 17])
    want = enc(x, seq, modality=modality)[rows.index]
    assert torch.allclose(enc(x, seq, modality=modality, rows=rows), want, atol=1e-5)


def test_rows_are_checked():
    seq = PackedSeqInfo.from_seqlens([3, 4])
    for bad, match in [([], "empty"), ([2, 1], "strictly increasing"), ([0, 7], r"\[0, 7\)"),
                       ([[0, 1]], "1-D"), ([0.5], "integers")]:
        with pytest.raises(ValueError, match=match):
            OutputRows.of(seq, bad)
    rows = OutputRows.of(seq, torch.tensor([1, 2, 4]))
    assert rows.width == 2 and rows.positions.tolist() == [1, 2, 1]
    assert rows.query_positions.tolist() == [[1, 2], [1, 0]]


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["auto", "sdpa"])  # auto: xformers where it imports
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_rows_on_cuda_equal_the_full_forward(attention, dtype, tol):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    enc = _encoder(attention=attention).cuda()
    seq = PackedSeqInfo.from_seqlens(LENGTHS, device="cuda")
    rows = OutputRows.first_tokens(seq)
    assert rows.index.device.type == "cuda"
    x = torch.randn(sum(LENGTHS), 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        full = enc(x, seq).index_select(0, rows.index)
        got = enc(x, seq, rows=rows)
    torch.testing.assert_close(got.float(), full.float(), atol=tol, rtol=tol)
    (gx_full,) = torch.autograd.grad(full.float().sum(), x)
    (gx,) = torch.autograd.grad(got.float().sum(), x)
    torch.testing.assert_close(gx, gx_full, atol=tol, rtol=tol)


def _fsdp_rank(rank: int, port: int, use_orig_params: bool, out) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from mmm.core.encoder import EncoderBlock

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        enc = _encoder()
        seq = PackedSeqInfo.from_seqlens(LENGTHS)
        rows = OutputRows.first_tokens(seq)
        x = torch.randn(seq.num_tokens, 32, generator=torch.Generator().manual_seed(1))

        class Wrapped(torch.nn.Module):  # FSDP wraps the root and every block, as pretrain's fsdp strategy
            def __init__(self):
                super().__init__()
                self.encoder = enc

            def forward(self, x, rows):
                return self.encoder(x, seq, rows=rows)

        model = FSDP(Wrapped(), auto_wrap_policy=ModuleWrapPolicy({EncoderBlock}), device_id=torch.device("cpu"),
                     use_orig_params=use_orig_params)
        full = model(x, None).index_select(0, rows.index)
        got = model(x, rows)
        got.sum().backward()
        out.put((rank, float((got - full).abs().max())))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_rows_under_fsdp_with_each_block_sharded(use_orig_params):
    """With every block its own FSDP unit, the rows path must gather the last block's weights (it goes through
    the block's wrapped forward); 2 ranks on CPU (gloo)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_rank, args=(r, port, use_orig_params, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = dict(out.get(timeout=5) for _ in procs)
    assert sorted(results) == [0, 1] and max(results.values()) < 1e-5, results
