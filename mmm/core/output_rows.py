"""The last encoder block computed only for the rows a head reads (MosaicBERT's final-layer subset).

MosaicBERT (Portes et al. 2023) runs its final layer for the [MASK] positions alone in pretraining
and for [CLS] alone in classification: no other token's last hidden state is ever read. The last
block still needs the keys and values of every token, but its queries, attention product, output
projection, MLP and norms then run on M rows instead of N. For a classifier on [CLS] (M = B) that
removes about 5/6 of the last block's matrix-multiply work (queries, projection and a 4× MLP:
10 of its 12 d² per token). :class:`OutputRows` names the rows; ``TransformerEncoder.forward(...,
rows=...)`` returns their (M, d) hidden states, equal to the full forward's rows.

The rows' attention runs on a padded layout for every backend: keys and values padded per
sequence to (B, H, T, D), the rows padded per sequence to (B, H, W, D), W being the most rows
of one sequence (1 for [CLS]). A padding slot is given position 0 of its sequence, so its mask
row is never empty; its output is dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mmm.core.attention import attend, bias_dtype
from mmm.core.packing import PackedSeqInfo
from mmm.core.position import ALiBi, alibi_block


@dataclass(frozen=True, eq=False)
class OutputRows:
    """Rows of a packed stream whose final hidden states are wanted (build with :meth:`first_tokens`
    or :meth:`of`; built on the host from the layout's host-side lengths, then moved once).

    Args:
        index: (M,) int64 rows of the stream (batch order), strictly increasing.
        pad_index: (M,) int64 slot of each row in the (B * width) padded layout of the rows.
        positions: (M,) int64 position of each row inside its sequence.
        query_positions: (B, width) int64 those positions in the padded layout (0 at padding slots).
        width: the most rows that one sequence has.
    """

    index: torch.Tensor
    pad_index: torch.Tensor
    positions: torch.Tensor
    query_positions: torch.Tensor
    width: int

    @classmethod
    def first_tokens(cls, seq: PackedSeqInfo) -> "OutputRows":
        """The first token ([CLS]) of every sequence."""
        return cls._build(seq, _starts(seq))

    @classmethod
    def of(cls, seq: PackedSeqInfo, rows: Union[Sequence[int], np.ndarray, torch.Tensor]) -> "OutputRows":
        """Given rows of the stream (host integers or a CPU tensor; strictly increasing, each in [0, N))."""
        if isinstance(rows, torch.Tensor):
            if rows.device.type != "cpu":
                raise ValueError("output rows are built on the host: pass a list or a CPU tensor, not a "
                                 f"{rows.device.type} tensor (reading it back would stall the device)")
            rows = rows.numpy()
        arr = np.asarray(rows)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"output rows must be a 1-D sequence of integers, got shape {arr.shape} of {arr.dtype}")
        n = int(sum(seq.lengths))
        if arr.size == 0:
            raise ValueError("output rows are empty: ask for at least one row")
        if arr[0] < 0 or arr[-1] >= n or (arr.size > 1 and (np.diff(arr) <= 0).any()):
            raise ValueError(f"output rows must be strictly increasing rows of the stream in [0, {n}); "
                             f"got {arr.tolist()[:8]}{' ...' if arr.size > 8 else ''}")
        return cls._build(seq, arr.astype(np.int64))

    @classmethod
    def _build(cls, seq: PackedSeqInfo, rows: np.ndarray) -> "OutputRows":
        lengths = np.asarray(seq.lengths, np.int64)
        starts = _starts(seq)
        seq_of_row = np.searchsorted(starts, rows, side="right") - 1  # (M,)
        first = np.searchsorted(seq_of_row, np.arange(len(lengths)), side="left")  # first row of each sequence
        slot = np.arange(len(rows)) - first[seq_of_row]  # rank of each row within its sequence
        width = int(slot.max()) + 1
        positions = rows - starts[seq_of_row]
        pad_index = seq_of_row * width + slot
        padded = np.zeros(len(lengths) * width, np.int64)
        padded[pad_index] = positions
        device = seq.cu_seqlens.device
        padded_positions = torch.from_numpy(padded).view(len(lengths), width)
        built = cls(torch.from_numpy(rows.copy()), torch.from_numpy(pad_index), torch.from_numpy(positions),
                    padded_positions, width)
        return built if device.type == "cpu" else built.to(device)

    def __len__(self) -> int:
        return self.index.shape[0]

    def to(self, device: torch.device | str) -> "OutputRows":
        """The same rows with their index tensors on ``device`` (to a GPU: pinned, non-blocking copies, so
        the host does not wait for the device's queue)."""
        device = torch.device(device)
        cuda = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if cuda and t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            return t.to(device, non_blocking=cuda)

        return self._mapped(move)

    def pin_memory(self) -> "OutputRows":
        """The same rows in pinned host memory (for non-blocking copies to the GPU)."""
        return self._mapped(torch.Tensor.pin_memory)

    def _mapped(self, move) -> "OutputRows":
        return dataclasses.replace(self, index=move(self.index), pad_index=move(self.pad_index),
                                   positions=move(self.positions), query_positions=move(self.query_positions))


def _starts(seq: PackedSeqInfo) -> np.ndarray:
    """(B,) int64 first row of every sequence in the stream, from the layout's host-side lengths."""
    return np.concatenate([[0], np.cumsum(seq.lengths)[:-1]]).astype(np.int64)


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo, rows: OutputRows,
                alibi: Optional[ALiBi], dropout_p: float, causal: bool) -> torch.Tensor:
    """Attention of the rows' (M, H, D) queries over their own sequences' (N, H, D) keys/values → (M, H, D).

    ``alibi``: the encoder's ALiBi module or None; ``causal``: a row sees only the keys at or before
    its own position.
    """
    b, heads, dim = seq.batch_size, q.shape[1], q.shape[2]
    kp, vp = (seq.pad(t).transpose(1, 2) for t in (k, v))  # (B, H, T, D)
    qp = q.new_zeros(b * rows.width, heads, dim).index_copy_(0, rows.pad_index, q)
    qp = qp.view(b, rows.width, heads, dim).transpose(1, 2)  # (B, H, W, D)
    keys = seq.key_padding[:, None, None, :]  # (B, 1, 1, T) True = attend
    key_pos = torch.arange(seq.max_seqlen, device=q.device)
    if causal:
        keys = keys & (key_pos[None, None, None, :] <= rows.query_positions[:, None, :, None])  # (B, 1, W, T)
    mask: torch.Tensor = keys
    if alibi is not None:
        bias = alibi_block(alibi.slopes, rows.query_positions.reshape(-1), key_pos, bias_dtype(q))  # (1, H, B*W, T)
        bias = bias.view(heads, b, rows.width, -1).transpose(0, 1)  # (B, H, W, T)
        mask = bias.masked_fill(~keys, torch.finfo(bias.dtype).min)
    out = attend(qp, kp, vp, mask, dropout_p)  # (B, H, W, D)
    return out.transpose(1, 2).reshape(b * rows.width, heads, dim).index_select(0, rows.pad_index)
