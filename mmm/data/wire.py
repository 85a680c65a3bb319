"""Batches from DataLoader workers to the training process as one message.

A DataLoader worker hands each batch to the training process through a ``multiprocessing`` queue.
PyTorch's own reduction sends every tensor's storage as a separate shared-memory segment: the worker
creates and fills it, and the training process receives its file descriptor over a new socket
connection to the worker and maps it (``torch.multiprocessing``'s ``file_descriptor`` strategy,
the Linux default). That fixed cost is paid per tensor. A packed text batch of ``text_mlm_tiny``
holds 23 small tensors (ids, positions, labels, offsets, the length groups' indices), about 150 KB
in all, and receiving it took the training process 12–14 ms (median, 1 worker already holding the
batch), and 14–60 ms inside a tiny run on two cores: up to 10 % of its steps' time.

:func:`to_wire`, the last stage of the training data module's pipelines when they run in workers
(:meth:`mmm.train.datamodule.StreamDataModule._data_loader`; ``make_pipeline`` itself is left as it is, so
its samples still collate with a DataLoader's defaults), wraps each batch a worker yields in a :class:`WireBatch`.
When the queue pickles it, tensors of up to :data:`INLINE_BYTES` go inside the message as
NumPy arrays (one copy into the pipe, one out, no per-tensor handshake); larger ones still take the
shared-memory path, which is faster for them (measured: one 4 MiB tensor costs the same both ways,
16 MiB costs 1.7× more inline). The training process unpickles the message into the batch itself,
so nothing downstream sees the wrapper. Outside a worker (``num_workers: 0``) batches pass through
untouched. Measured on the tiny text batch: 9–12 → 2.6–2.7 ms to receive (``python -m benchmarks.loader``
times both ways side by side; ``--transfer-batches``).
"""
from __future__ import annotations

import io
import logging
import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterator

import torch
from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

INLINE_BYTES = 1 << 20
"""Tensors up to this many bytes travel inside the message; larger ones through shared memory."""


_warned = False  # the fallback is reported once per worker


def _tensor_from_array(array: Any) -> torch.Tensor:
    return torch.from_numpy(array)


class _WirePickler(ForkingPickler):
    """``ForkingPickler`` (so large tensors keep torch's shared-memory reduction) that writes small
    plain CPU tensors as NumPy arrays, whose bytes are part of the pickle stream."""

    def reducer_override(self, obj: Any) -> Any:
        # never raises: a failure half-way through a dump would leave the large tensors already moved to
        # shared memory (and their fds registered with the worker) unclaimed
        if type(obj) is not torch.Tensor or obj.layout is not torch.strided or obj.device.type != "cpu":
            return NotImplemented
        try:
            if obj.nbytes > INLINE_BYTES:
                return NotImplemented
            array = obj.detach().resolve_conj().resolve_neg().numpy()  # bf16 and other non-NumPy dtypes raise
        except Exception:
            return NotImplemented
        return _tensor_from_array, (array,)


def _from_message(payload: bytes) -> Any:
    return pickle.loads(payload)


def _as_is(batch: Any) -> Any:
    return batch


class WireBatch:
    """A batch on its way out of a DataLoader worker; pickles to a message that unpickles to the batch."""

    __slots__ = ("batch",)

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __reduce__(self):
        try:
            stream = io.BytesIO()
            _WirePickler(stream, 5).dump(self.batch)  # protocol 5: arrays in-band as bytearray (writable)
            return _from_message, (stream.getvalue(),)
        except Exception as err:  # never lose a batch to the fast path: fall back to torch's own reduction
            global _warned
            if not _warned:
                _warned = True
                log.warning("batch transfer: packing a %s into one message failed (%s: %s); this worker sends such "
                            "batches tensor by tensor", type(self.batch).__name__, type(err).__name__, err)
            return _as_is, (self.batch,)


def to_wire(src: Iterator[Any]) -> Iterator[Any]:
    """Pipeline stage: inside a DataLoader worker, wrap each item in a :class:`WireBatch`; in the main
    process (no workers), pass items through."""
    in_worker = get_worker_info() is not None
    for item in src:
        yield WireBatch(item) if in_worker else item
