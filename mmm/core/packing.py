"""Packed (unpadded) sequences: one flat token stream plus ``cu_seqlens``.

Variable-length sequences are concatenated into ``N`` tokens; ``cu_seqlens`` (B+1,) holds the
offsets, as in FlashAttention's varlen API and MosaicBERT's unpadding. Linear layers run on the
``N`` real tokens only. Attention backends without a varlen kernel (SDPA, math) scatter into a
padded (B, T_max) layout for the attention product alone and gather back.

Everything a layer needs is computed once, when the batch is made (in the collator, from the
host-side lengths) or moved to a device: the padded-layout index, the key-padding mask, the
length groups the SDPA backend pads separately and, on CUDA, the xformers block-diagonal masks
(bidirectional and causal).
A :class:`PackedSeqInfo` is immutable; no layer reads a length back from the device
(``.tolist()`` / ``int(tensor)`` would stall the GPU once per layer) or fills a cache inside a
compiled region.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from mmm.host_reads import on_host

PAD_GROUPS = 4
"""Most contiguous length groups a batch of ≥ 2·PAD_GROUPS sequences is split into for padded backends."""


class LongestFirst(NamedTuple):
    """A batch's stream reordered so that its sequences run longest first (each sequence's tokens
    stay contiguous and in order), for the length groups of padded backends.

    Collators pack longest first already; fine-tuning and embedding batches come in data order, where
    contiguous groups would each be padded to nearly the batch's longest sequence. The encoder gathers
    the stream into this order once per forward, runs every layer on ``layout``, and scatters back.
    """

    gather: torch.Tensor  # (N,) int64: token i of the reordered stream is token gather[i] of the batch
    scatter: torch.Tensor  # (N,) int64: token j of the batch is token scatter[j] of the reordered stream
    layout: "PackedSeqInfo"  # the reordered stream's layout, with its contiguous length groups


@dataclass(frozen=True, eq=False)
class PackedSeqInfo:
    """Layout of a packed batch, shared by every encoder layer (build it with :meth:`from_seqlens`).

    Args:
        cu_seqlens: (B+1,) int32 offsets of each sequence in the flat stream.
        max_seqlen: length of the padded layout (the longest sequence unless padded further).
        position_ids: (N,) int64 position of each token inside its sequence.
        lengths: the B sequence lengths as host integers (read on the host, never from the device).
        pad_index: (N,) int64 index of each token in the flattened (B * max_seqlen) padded layout.
        key_padding: (B, max_seqlen) bool, True at real tokens.
        is_uniform: every sequence has ``max_seqlen`` tokens (no padding is ever needed).
        pad_groups: ``(token_start, token_end, layout)`` per contiguous length group, or () when the
            batch is padded as one (see :meth:`from_seqlens`).
        attn_bias: the xformers ``BlockDiagonalMask`` of the batch on CUDA, else None.
        causal_attn_bias: its causal form (``BlockDiagonalCausalMask``, sharing the same offsets), else None.
        longest_first: for a batch not in longest-first order whose sorted form has length groups,
            the reordering to it (:class:`LongestFirst`); else None.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    lengths: Tuple[int, ...]
    pad_index: torch.Tensor
    key_padding: torch.Tensor
    is_uniform: bool
    pad_groups: Tuple[Tuple[int, int, "PackedSeqInfo"], ...] = ()
    attn_bias: Any = None
    causal_attn_bias: Any = None
    longest_first: Optional[LongestFirst] = None

    @classmethod
    def from_seqlens(cls, seqlens: Sequence[int], device: torch.device | str | None = None,
                     max_seqlen: Optional[int] = None, pad_groups: int = PAD_GROUPS) -> "PackedSeqInfo":
        """Layout for sequences of the given lengths (all ≥ 1).

        Args:
            seqlens: host-side sequence lengths, in stream order.
            device: where the index tensors live (built on the host and copied once).
            max_seqlen: pad to this length instead of the longest sequence (benchmarks of padded baselines).
            pad_groups: split a batch of at least ``2 * pad_groups`` sequences into at most that
                many contiguous runs, each padded only to its own longest sequence (collators pack
                longest first, so a run holds similar lengths; see :func:`group_bounds`); a batch in
                another order also gets the grouped layout of its longest-first reordering
                (``longest_first``); 0 = never split.
        """
        lengths = tuple(int(n) for n in seqlens)
        if any(n != m for n, m in zip(seqlens, lengths)):  # 3.7 would be cut to 3 tokens silently
            raise ValueError(f"sequence lengths must be whole numbers, got {list(seqlens)}")
        if len(lengths) == 0:
            raise ValueError("a packed batch needs at least one sequence")
        if min(lengths) < 1:
            raise ValueError(f"sequence lengths must be ≥ 1, got {list(lengths)}")
        longest = max(lengths)
        width = longest if max_seqlen is None else int(max_seqlen)
        if width < longest:
            raise ValueError(f"max_seqlen={width} is shorter than the longest sequence ({longest})")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if all(n == width for n in lengths):
            return cls._uniform(len(lengths), width, device)
        with on_host():  # the layout is built from host lengths in host tensors, then copied once
            info = cls._build(lengths, width, pad_groups)
        return info if device.type == "cpu" else info.to(device)

    @classmethod
    def _uniform(cls, batch: int, length: int, device: torch.device) -> "PackedSeqInfo":
        """B sequences of one length, built on ``device`` directly (no host-to-device copy)."""
        n = batch * length
        cu = torch.arange(0, n + 1, length, dtype=torch.int32, device=device)
        pos = torch.arange(length, device=device).repeat(batch)
        info = cls(cu, length, pos, (length,) * batch, torch.arange(n, device=device),
                   torch.ones(batch, length, dtype=torch.bool, device=device), True)
        return info if device.type != "cuda" else info._with_attn_bias()

    @classmethod
    def _build(cls, lengths: Tuple[int, ...], width: int, pad_groups: int) -> "PackedSeqInfo":
        lens = torch.tensor(lengths, dtype=torch.int64)
        b, n = len(lengths), sum(lengths)
        cu = torch.zeros(b + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        seq_of_token = torch.repeat_interleave(torch.arange(b), lens, output_size=n)
        pos = torch.arange(n) - cu[:-1].long()[seq_of_token]
        pad_index = seq_of_token * width + pos
        valid = torch.zeros(b * width, dtype=torch.bool)
        valid[pad_index] = True
        groups: Tuple[Tuple[int, int, PackedSeqInfo], ...] = ()
        bounds = group_bounds(lengths, pad_groups)
        if bounds:
            starts = [0]
            for length in lengths:
                starts.append(starts[-1] + length)
            groups = tuple((starts[i0], starts[i1], cls.from_seqlens(lengths[i0:i1], pad_groups=0))
                           for i0, i1 in zip(bounds[:-1], bounds[1:]))
        return cls(cu, width, pos, lengths, pad_index, valid.view(b, width), False, groups,
                   longest_first=cls._longest_first(lengths, cu, width, pad_groups))

    @classmethod
    def _longest_first(cls, lengths: Tuple[int, ...], cu: torch.Tensor, width: int,
                       pad_groups: int) -> Optional[LongestFirst]:
        """The reordering to longest first, when the batch is not in that order and its sorted form has groups."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
        if pad_groups <= 0 or len(lengths) < 2 * pad_groups or order == list(range(len(lengths))):
            return None
        layout = cls._build(tuple(lengths[i] for i in order), width, pad_groups)
        if not layout.pad_groups:
            return None
        idx = torch.tensor(order)
        gather = index_ranges(cu[:-1].long()[idx], torch.tensor(lengths)[idx])  # (N,)
        scatter = torch.empty_like(gather)
        scatter[gather] = torch.arange(gather.shape[0])
        return LongestFirst(gather, scatter, layout)

    @property
    def seqlens(self) -> List[int]:
        """The sequence lengths (host integers; no device read)."""
        return list(self.lengths)

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[0]

    def to(self, device: torch.device | str) -> "PackedSeqInfo":
        """The same layout on ``device`` (non-blocking from pinned memory; the xformers mask is built on CUDA)."""
        device = torch.device(device)
        non_blocking = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        info = self._mapped(move, lambda g: g.to(device))
        return info._with_attn_bias() if device.type == "cuda" else info

    def pin_memory(self) -> "PackedSeqInfo":
        """The same layout in pinned host memory (for non-blocking copies to the GPU)."""
        return self._mapped(torch.Tensor.pin_memory, PackedSeqInfo.pin_memory)

    def _mapped(self, move: Callable[[torch.Tensor], torch.Tensor],
                nested: Callable[["PackedSeqInfo"], "PackedSeqInfo"]) -> "PackedSeqInfo":
        """This layout with every tensor passed through ``move`` and every nested layout (length groups,
        the longest-first reordering) through ``nested``; without xformers masks (``to`` rebuilds them)."""
        lf = self.longest_first
        return dataclasses.replace(
            self, cu_seqlens=move(self.cu_seqlens), position_ids=move(self.position_ids),
            pad_index=move(self.pad_index), key_padding=move(self.key_padding),
            pad_groups=tuple((s, e, nested(g)) for s, e, g in self.pad_groups), attn_bias=None, causal_attn_bias=None,
            longest_first=lf and LongestFirst(move(lf.gather), move(lf.scatter), nested(lf.layout)))

    def _with_attn_bias(self) -> "PackedSeqInfo":
        if not self.is_uniform and _xformers_bias_available():
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask

            mask = BlockDiagonalMask.from_seqlens(list(self.lengths), device=self.cu_seqlens.device)
            return dataclasses.replace(self, attn_bias=mask, causal_attn_bias=mask.make_causal())
        return self

    # -- padded views for backends without a varlen kernel --------------------------------

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) packed → (B, T_max, ...) padded with zeros."""
        if self.is_uniform:
            return x.view(self.batch_size, self.max_seqlen, *x.shape[1:])
        out = x.new_zeros(self.batch_size * self.max_seqlen, *x.shape[1:])
        out.index_copy_(0, self.pad_index, x)  # in place: the out-of-place form clones the zeros first
        return out.view(self.batch_size, self.max_seqlen, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T_max, ...) padded → (N, ...) packed."""
        flat = x.reshape(self.batch_size * self.max_seqlen, *x.shape[2:])
        if self.is_uniform:
            return flat
        return flat.index_select(0, self.pad_index)


def group_bounds(lengths: Sequence[int], groups: int = PAD_GROUPS) -> List[int]:
    """Where the length groups of a padded backend start and end, as sequence indices ``[0, …, B]``;
    ``[]`` = pad the batch as one.

    A batch of at least ``2 * groups`` sequences is split into at most ``groups`` contiguous runs.
    The leading run of sequences as long as the first one (collators pack longest first, and
    chunked text fills most of a batch with full ``max_len`` chunks) is a group of its own: it needs
    no padding, no gather and no mask (its padded view is the stream itself). The remaining
    sequences are cut where the attention work of the padded groups plus a fixed cost per group,
    ``sum(rows · width² + GROUP_CALL_WORK)``, is least (:func:`_least_work_cuts`), so a group is
    split off only where the padding it saves outweighs another kernel call.

    Args:
        lengths: the sequence lengths in stream order.
        groups: the most groups; 0 = never split.
    """
    b = len(lengths)
    if groups <= 0 or b < 2 * groups:
        return []
    run = 1
    while run < b and lengths[run] == lengths[0]:
        run += 1
    head = [0, run] if 2 <= run < b else [0]
    start = head[-1]
    cuts = groups - (len(head) - 1)
    bounds = head + [start + i for i in _least_work_cuts(lengths[start:], cuts)[1:]]
    return bounds if len(bounds) > 2 else []


GROUP_CALL_WORK = 2048
"""What one more length group costs, in the ``rows · width²`` units of attention work: the kernel
calls, pads and gathers of a group per layer (fitted at width 128, where one group's fixed cost is
about that of attending over 2048 token pairs)."""


def _least_work_cuts(lengths: Sequence[int], groups: int) -> List[int]:
    """Bounds ``[0, …, len(lengths)]`` of at most ``groups`` contiguous runs with the least
    ``sum(rows · width² + GROUP_CALL_WORK)``, width = a run's longest sequence (dynamic programming
    over host integers, vectorised per run count; a tie goes to fewer runs)."""
    lens = np.asarray(lengths, dtype=np.float64)
    b = len(lens)
    work = np.full((b + 1, b + 1), np.inf)  # work[i, j]: one run of lengths[i:j]
    for i in range(b):
        width = np.maximum.accumulate(lens[i:])
        work[i, i + 1:] = np.arange(1, b - i + 1) * width * width + GROUP_CALL_WORK
    best = np.full(b + 1, np.inf)
    best[0] = 0.0
    back, totals = [], []
    for _ in range(groups):
        cand = best[:, None] + work  # (from i, to j)
        back.append(cand.argmin(0))
        best = cand.min(0)
        totals.append(best[b])
    g = int(np.argmin(totals)) + 1  # argmin: the first (fewest runs) on a tie
    bounds = [b]
    for k in range(g - 1, -1, -1):
        bounds.append(int(back[k][bounds[-1]]))
    return bounds[::-1]


@functools.lru_cache(maxsize=None)
def _xformers_bias_available() -> bool:
    try:
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask  # noqa: F401
    except Exception:
        return False
    return True


def index_ranges(starts, lengths) -> torch.Tensor:
    """Concatenated ``arange(start, start + length)`` over runs, as int64 (stream indices of token runs).

    Args:
        starts: (R,) first index of each run (tensor or sequence of ints; a tensor keeps its device).
        lengths: (R,) length of each run (≥ 0).
    """
    starts = torch.as_tensor(starts, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=starts.device)
    d = starts.device
    if lengths.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=d)
    total = int(lengths.sum())  # one read; collators call this on host tensors
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=d), lengths, output_size=total)
    first = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths, output_size=total)
    return starts[owner] + torch.arange(total, device=d) - first


def pack_padded(attention_mask: torch.Tensor) -> PackedSeqInfo:
    """Layout of a right-padded (B, T) batch given its attention mask (1 = real token).

    Args:
        attention_mask: (B, T) with ones on a prefix of each row.
    """
    lengths = attention_mask.long().sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every sequence needs at least one real token (attention_mask row of zeros found)")
    expected = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(expected, attention_mask.bool()):
        raise ValueError("attention_mask must be right-padded (ones then zeros in every row)")
    return PackedSeqInfo.from_seqlens(lengths.tolist(), device=attention_mask.device)


def mask_positions(mask: torch.Tensor, count: Optional[int]) -> torch.Tensor:
    """(count,) int64 indices of the True entries of a 1-D bool ``mask``, in order. When the host
    already knows their number (``count``) there is no device read (``nonzero`` would need one to size
    its output): the running count of True entries is searched for each of 1 … ``count``. With
    ``count`` None this is ``nonzero``, which reads it back.
    """
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(f"mask_positions: expected a 1-D bool mask, got {tuple(mask.shape)} {mask.dtype}")
    if count is None:
        return mask.nonzero().squeeze(1)
    running = torch.cumsum(mask, 0)  # (N,) int64
    wanted = torch.arange(1, count + 1, device=mask.device, dtype=running.dtype)
    return torch.searchsorted(running, wanted)
