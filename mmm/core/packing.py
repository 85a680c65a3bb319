"""Packed (unpadded) sequences: one flat token stream plus ``cu_seqlens``.

Variable-length sequences are concatenated into ``N`` tokens; ``cu_seqlens`` (B+1,) holds the
offsets, as in FlashAttention's varlen API and MosaicBERT's unpadding. Linear layers run on the
``N`` real tokens only. Attention backends without a varlen kernel (SDPA, math) scatter into a
padded (B, T_max) layout for the attention product alone and gather back; the index tensors for
that are built once per batch here and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass
class PackedSeqInfo:
    """Layout of a packed batch, shared by every encoder layer.

    Args:
        cu_seqlens: (B+1,) int32 offsets of each sequence in the flat stream.
        max_seqlen: length of the longest sequence.
        position_ids: (N,) int64 position of each token inside its sequence.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    _pad_index: Optional[torch.Tensor] = None
    _key_padding: Optional[torch.Tensor] = None
    _groups: Optional[dict] = None

    @classmethod
    def from_seqlens(cls, seqlens: Sequence[int], device: torch.device | str | None = None) -> "PackedSeqInfo":
        """Layout for sequences of the given lengths (all ≥ 1)."""
        if len(seqlens) == 0:
            raise ValueError("a packed batch needs at least one sequence")
        if min(seqlens) < 1:
            raise ValueError(f"sequence lengths must be ≥ 1, got {list(seqlens)}")
        lens = torch.as_tensor(list(seqlens), dtype=torch.int64)
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        starts = torch.repeat_interleave(cu[:-1].long(), lens)
        pos = torch.arange(int(cu[-1])) - starts
        return cls(cu.to(device), int(lens.max()), pos.to(device))

    @property
    def seqlens(self) -> List[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.position_ids.numel()

    @property
    def is_uniform(self) -> bool:
        """True when every sequence has the same length (no padding is ever needed)."""
        return self.num_tokens == self.batch_size * self.max_seqlen

    def to(self, device: torch.device | str) -> "PackedSeqInfo":
        return PackedSeqInfo(self.cu_seqlens.to(device), self.max_seqlen, self.position_ids.to(device))

    # -- padded views for backends without a varlen kernel --------------------------------

    def pad_index(self) -> torch.Tensor:
        """(N,) index of each packed token in the flattened (B * T_max) padded layout."""
        if self._pad_index is None:
            seq_of_token = torch.repeat_interleave(
                torch.arange(self.batch_size, device=self.position_ids.device),
                (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long(),
            )
            self._pad_index = seq_of_token * self.max_seqlen + self.position_ids
        return self._pad_index

    def key_padding(self) -> torch.Tensor:
        """(B, T_max) bool, True at real tokens."""
        if self._key_padding is None:
            valid = torch.zeros(self.batch_size * self.max_seqlen, dtype=torch.bool, device=self.position_ids.device)
            valid[self.pad_index()] = True
            self._key_padding = valid.view(self.batch_size, self.max_seqlen)
        return self._key_padding

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) packed → (B, T_max, ...) padded with zeros."""
        if self.is_uniform:
            return x.view(self.batch_size, self.max_seqlen, *x.shape[1:])
        out = x.new_zeros(self.batch_size * self.max_seqlen, *x.shape[1:])
        out[self.pad_index()] = x
        return out.view(self.batch_size, self.max_seqlen, *x.shape[1:])

    def groups(self, num_groups: int) -> List[Tuple[int, int, "PackedSeqInfo"]]:
        """Split into up to ``num_groups`` contiguous runs of sequences, each padded only to its own max.

        Returns ``(token_start, token_end, layout)`` per group. Collators pack sequences longest
        first (:func:`mmm.batch.pack_masked`), so each run holds similar lengths and padding the
        runs separately wastes far less attention compute than padding all to ``max_seqlen``.
        """
        if self._groups is None:
            self._groups = {}
        if num_groups not in self._groups:
            cu = self.cu_seqlens.tolist()
            lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
            bounds = [round(i * self.batch_size / num_groups) for i in range(num_groups + 1)]
            bounds = sorted(set(bounds))
            groups = []
            for i0, i1 in zip(bounds[:-1], bounds[1:]):
                s, e = cu[i0], cu[i1]
                sub = PackedSeqInfo(self.cu_seqlens[i0:i1 + 1] - cu[i0], max(lens[i0:i1]), self.position_ids[s:e])
                groups.append((s, e, sub))
            self._groups[num_groups] = groups
        return self._groups[num_groups]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T_max, ...) padded → (N, ...) packed."""
        flat = x.reshape(self.batch_size * self.max_seqlen, *x.shape[2:])
        if self.is_uniform:
            return flat
        return flat[self.pad_index()]


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
    owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=d), lengths)
    offsets = torch.arange(int(lengths.sum()), device=d) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths,
                                                                                  lengths)
    return starts[owner] + offsets


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
