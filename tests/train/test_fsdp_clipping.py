"""Gradient clipping under FSDP: ``MaskedModelingModule.configure_gradient_clipping`` clips by the norm over
every rank's shards (``FullyShardedDataParallel.clip_grad_norm_`` on the root), so two sharded ranks, each
on its half of a batch, make the same clipped update as one process on the whole batch.

Lightning's FSDPStrategy runs on CUDA only, so the ranks here are two gloo processes that wrap the model
as ``pretrain``'s ``fsdp`` strategy does (every Transformer block its own FSDP unit, the rest in the root)
and hand the module a trainer whose strategy holds that root. Both ``use_orig_params`` settings are run
(pretrain uses ``True`` for multi-task and phased runs).
"""
from __future__ import annotations

import copy
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from mmm.batch import PackedBatch, TokenInput, TokenTargets
from mmm.core.packing import PackedSeqInfo
from mmm.train.pretrain import build_run

CLIP = 1e-3  # far below the tiny model's first gradient norm (about 1): the clip acts on every rank


def _merge(a: PackedBatch, b: PackedBatch) -> PackedBatch:
    """One packed batch holding the sequences of ``a`` then ``b``."""
    seq = PackedSeqInfo.from_seqlens([int(x) for s in (a, b) for x in s.seq.cu_seqlens.diff()])
    ta, tb = a.targets["text"], b.targets["text"]
    return PackedBatch(seq, {"text": TokenInput(torch.cat([a.inputs["text"].ids, b.inputs["text"].ids]), seq.position_ids)},
                       {"text": TokenTargets(torch.cat([ta.positions, tb.positions + a.seq.num_tokens]),
                                             torch.cat([ta.labels, tb.labels]))})


def _clipped_update(module, root, batch) -> tuple:
    """Forward, backward, mmm's clipping hook and an SGD step of lr 1 on ``root`` (the module's model, wrapped
    or not); returns the parameters' change (= minus the clipped gradient) and the gradient norm before clipping."""
    params = [p for p in root.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in _named_full(root)}
    opt = torch.optim.SGD(params, lr=1.0)
    opt.zero_grad(set_to_none=True)
    loss, _ = root(batch)
    loss.backward()
    local_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root), precision_plugin=SimpleNamespace())
    module._window_trained = True
    module.configure_gradient_clipping(opt, CLIP, "norm")
    opt.step()
    return {n: p.detach() - before[n] for n, p in _named_full(root)}, local_norm


def _named_full(root):
    """(name, full parameter) pairs; for an FSDP root, gathered and with FSDP's prefixes removed."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(root, FSDP):
        return [(n, p) for n, p in root.named_parameters()]
    with FSDP.summon_full_params(root):
        return [(n, p.detach().clone()) for n, p in root.named_parameters()]


def _rank(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from mmm.core.encoder import EncoderBlock

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        saved = torch.load(path, weights_only=False)
        results = {}
        for use_orig_params in (False, True):
            module = copy.deepcopy(saved["module"])
            root = FSDP(module.model, auto_wrap_policy=ModuleWrapPolicy({EncoderBlock}), device_id=torch.device("cpu"),
                        use_orig_params=use_orig_params)
            results[use_orig_params] = _clipped_update(module, root, saved["halves"][rank])
        torch.save(results, f"{path}.rank{rank}")  # a file: tensors in a queue die with their process
    finally:
        dist.destroy_process_group()


def test_two_fsdp_ranks_clip_by_the_norm_over_all_shards(tmp_path: Path):
    import torch.multiprocessing as mp

    run = build_run(tiny_config(tmp_path / "run", **{"data.val": None, "data.batch_size": 4, "trainer.max_steps": 1,
                                                     "model.encoder.dropout": 0.0, "model.encoder.attn_dropout": 0.0}))
    run.datamodule.setup("fit")
    loader = iter(run.datamodule.train_dataloader())
    first = next(loader)
    count = first.targets["text"].positions.numel()
    # unequal masked counts: per-rank means would weigh the tokens unequally (mmm divides by the global count)
    halves = [first, next(b for b in loader if b.targets["text"].positions.numel() != count)]
    module = run.module.train()
    path = tmp_path / "shared.pt"
    torch.save({"module": module, "halves": halves}, path)

    reference = copy.deepcopy(module)
    expected, full_norm = _clipped_update(reference, reference.model, _merge(*halves))
    assert full_norm > 10 * CLIP  # the clip acts

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, port, str(path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = {r: torch.load(f"{path}.rank{r}", weights_only=False) for r in range(2)}

    norm = float(torch.linalg.vector_norm(torch.stack([d.norm() for d in expected.values()])))
    assert norm == pytest.approx(CLIP, rel=1e-3)
    for rank, per_setting in results.items():
        for use_orig_params, (update, shard_norm) in per_setting.items():
            where = f"rank {rank}, use_orig_params={use_orig_params}"
            # a clip by this rank's own shard would scale by a different factor
            assert shard_norm < 0.95 * full_norm, f"{where}: shard norm {shard_norm} vs full {full_norm}"
            assert set(update) == set(expected), where
            for name, delta in update.items():
                torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-7,
                                           msg=lambda m, n=name, w=where: f"{w}, {n}: {m}")
