"""mmm.data.wire: batches leave DataLoader workers as one message; what arrives is the batch itself."""
from __future__ import annotations

import logging
import pickle
import warnings
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from mmm.batch import PackedBatch, TokenInput, TokenTargets
from mmm.core.packing import PackedSeqInfo
from mmm.data import wire
from mmm.data.wire import INLINE_BYTES, WireBatch, to_wire


def _batch() -> PackedBatch:
    seq = PackedSeqInfo.from_seqlens([5, 3, 3])
    ids = TokenInput(torch.arange(11), seq.position_ids.clone())
    targets = TokenTargets(torch.tensor([1, 6, 9]), torch.tensor([4, 2, 7]))
    return PackedBatch(seq, {"text": ids}, {"text": targets}, extras={"data_errors": {"worker": 0, "total": 0}})


def _send(obj):
    """What a DataLoader worker's queue does with an item, and the training process with the message."""
    return pickle.loads(bytes(ForkingPickler.dumps(obj)))


def _tensors(obj, out=None):
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    elif hasattr(obj, "__dataclass_fields__") or hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            _tensors(v, out)
    return out


def test_a_wired_batch_arrives_as_the_same_batch_with_no_shared_memory():
    sent = _batch()
    got = _send(WireBatch(sent))
    assert type(got) is PackedBatch and got.extras == sent.extras
    assert torch.equal(got.inputs["text"].ids, sent.inputs["text"].ids)
    assert torch.equal(got.targets["text"].positions, sent.targets["text"].positions)
    assert torch.equal(got.targets["text"].labels, sent.targets["text"].labels)
    assert torch.equal(got.seq.cu_seqlens, sent.seq.cu_seqlens) and got.seq.seqlens == sent.seq.seqlens
    received = _tensors(got)
    assert len(received) >= 5
    assert not any(t.is_shared() for t in received)  # inside the message: no shared-memory segment, no fd
    # the usual way, every tensor is its own shared-memory segment
    assert all(t.is_shared() for t in _tensors(_send(sent)) if t.numel())


def test_received_tensors_are_writable_and_keep_dtype_and_layout():
    values = {"bool": torch.tensor([True, False, True]), "u8": torch.arange(6, dtype=torch.uint8).view(2, 3),
              "f32": torch.randn(4, 5), "i32": torch.arange(4, dtype=torch.int32),
              "strided": torch.arange(20).view(4, 5)[:, 1::2], "empty": torch.zeros(0, 3),
              "bf16": torch.randn(3, dtype=torch.bfloat16)}  # no NumPy dtype: sent the usual way
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "The given NumPy array is not writable"
        got = _send(WireBatch(values))
    for name, t in values.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    got["f32"].add_(1.0)  # writable: the message's bytes were copied into a bytearray the tensor owns
    assert torch.equal(got["f32"], values["f32"] + 1.0)
    assert got["bf16"].is_shared() and not got["f32"].is_shared()


def test_large_tensors_keep_the_shared_memory_path():
    big = torch.zeros(INLINE_BYTES // 4 + 1)  # one element over the limit
    small = torch.ones(8)
    got = _send(WireBatch({"big": big, "small": small}))
    assert got["big"].is_shared() and not got["small"].is_shared()
    assert torch.equal(got["big"], big) and torch.equal(got["small"], small)


def test_a_batch_the_message_cannot_carry_goes_the_usual_way(caplog, monkeypatch):
    monkeypatch.setattr(wire, "_warned", False)

    def refuse(self, obj):
        raise RuntimeError("cannot pack this")

    monkeypatch.setattr(wire._WirePickler, "reducer_override", refuse)
    with caplog.at_level(logging.WARNING, logger="mmm.data.wire"):
        got = _send(WireBatch({"x": torch.arange(3)}))
        _send(WireBatch({"x": torch.arange(3)}))
    assert torch.equal(got["x"], torch.arange(3)) and got["x"].is_shared()
    assert caplog.text.count("sends such batches tensor by tensor") == 1  # once per worker
    assert "RuntimeError: cannot pack this" in caplog.text


def test_to_wire_wraps_only_inside_a_worker():
    items = [_batch(), _batch()]
    assert list(to_wire(iter(items))) == items  # main process: untouched
    loader = torch.utils.data.DataLoader(_Items(), batch_size=None, num_workers=1)
    got = list(loader)
    assert [type(b) for b in got] == [PackedBatch, PackedBatch]
    assert all(not t.is_shared() for b in got for t in _tensors(b))  # they came through the wire


class _Items(torch.utils.data.IterableDataset):
    def __iter__(self):
        return to_wire(iter([_batch(), _batch()]))


def test_the_training_loader_delivers_the_same_batches_with_a_worker_as_without(tmp_path):
    """The text task's training stream: one worker (batches through the wire) against none."""
    from conftest import tiny_config
    from mmm.train.pretrain import build_run

    def first(workers, **overrides):
        run = build_run(tiny_config(tmp_path / f"run{workers}", **{"data.num_workers": workers, "data.val": None,
                                                                     **overrides}))
        it = iter(run.datamodule.task_loader())
        return [next(it) for _ in range(3)]

    without = first(0)  # (HF tokenizer training is not reproducible across runs: the second run reuses this one's)
    with_worker = first(1, **{"model.text.tokenizer_path": str(tmp_path / "run0" / "tokenizer")})
    for a, b in zip(with_worker, without):
        ta, tb = _tensors(a.seq) + _tensors(a.inputs) + _tensors(a.targets), \
            _tensors(b.seq) + _tensors(b.inputs) + _tensors(b.targets)
        assert len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb))
        assert not any(t.is_shared() for t in ta)


def test_the_training_module_wires_only_loaders_with_workers(tmp_path):
    """to_wire is the last stage of the data module's loaders with workers; make_pipeline stays as it is
    (its samples still collate with a DataLoader's defaults)."""
    import dataclasses

    from conftest import tiny_config
    from mmm.train.pretrain import build_run

    run = build_run(tiny_config(tmp_path / "run", **{"data.val": None, "data.num_workers": 0}))
    dm = run.datamodule
    assert to_wire not in dm.task_loader().dataset.pipeline
    with_worker = type(dm)(dataclasses.replace(dm.cfg, num_workers=1), dm.tasks).task_loader()
    assert with_worker.dataset.pipeline[-1] is to_wire


def test_a_tensor_the_message_cannot_carry_takes_the_usual_way_without_failing_the_batch():
    sparse = torch.eye(3).to_sparse()  # nbytes is not defined for sparse tensors
    got = _send(WireBatch({"sparse": sparse, "dense": torch.arange(4)}))
    assert torch.equal(got["sparse"].to_dense(), torch.eye(3)) and not got["dense"].is_shared()
