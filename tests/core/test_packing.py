import pytest
import torch

from mmm.core.packing import GROUP_CALL_WORK, PackedSeqInfo, group_bounds, pack_padded


def test_from_seqlens_layout():
    seq = PackedSeqInfo.from_seqlens([3, 1, 2])
    assert seq.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert seq.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert seq.max_seqlen == 3 and seq.batch_size == 3 and not seq.is_uniform
    assert seq.key_padding.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_pad_unpad_round_trip():
    seq = PackedSeqInfo.from_seqlens([4, 2, 5])
    x = torch.randn(11, 3, 2)
    padded = seq.pad(x)
    assert padded.shape == (3, 5, 3, 2)
    assert torch.equal(padded[1, 2:], torch.zeros(3, 3, 2))
    assert torch.equal(seq.unpad(padded), x)


def test_uniform_batches_need_no_padding():
    seq = PackedSeqInfo.from_seqlens([3, 3])
    x = torch.randn(6, 4)
    assert seq.is_uniform and torch.equal(seq.unpad(seq.pad(x)), x)


def test_pack_padded_and_errors():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert pack_padded(mask).cu_seqlens.tolist() == [0, 3, 4]
    with pytest.raises(ValueError, match="right-padded"):
        pack_padded(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="at least one real token"):
        pack_padded(torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="≥ 1"):
        PackedSeqInfo.from_seqlens([2, 0])


def test_length_groups_put_the_leading_full_length_run_alone():
    """Chunked text: the run of full-length sequences needs no padding (a uniform group, a view of the
    stream); the rest is cut where the padded attention work plus a fixed cost per group is least."""
    lengths = [128] * 22 + [127, 126, 89, 70, 65, 51, 50, 46, 21, 13]
    assert group_bounds(lengths) == [0, 22, 24, 27, 32]
    seq = PackedSeqInfo.from_seqlens(lengths)
    first = seq.pad_groups[0]
    assert first[:2] == (0, 22 * 128) and first[2].is_uniform
    assert [g[2].max_seqlen for g in seq.pad_groups] == [128, 127, 89, 51]
    x = torch.randn(seq.num_tokens, 3)
    assert torch.equal(torch.cat([g.unpad(g.pad(x[s:e])) for s, e, g in seq.pad_groups]), x)
    # short sequences: padding to 9 costs less than another kernel call, so the batch is padded as one
    assert group_bounds([9, 8, 9, 8, 9, 8, 5, 4]) == [] and group_bounds([10, 10, 9, 9, 8, 8, 7, 7, 6, 6]) == [0, 2, 10]
    assert group_bounds([40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2]) == [0, 1, 3, 4, 11]  # any order: still least work
    assert group_bounds([5, 4, 3]) == [] and group_bounds(lengths, groups=0) == []


def test_length_groups_are_the_least_work_cut():
    """The dynamic programme finds the same least ``rows · width² + GROUP_CALL_WORK`` as trying every cut."""
    import itertools
    import random

    def work(lens, bounds):
        return sum((j - i) * max(lens[i:j]) ** 2 + GROUP_CALL_WORK for i, j in zip(bounds[:-1], bounds[1:]))

    rng = random.Random(0)
    for _ in range(30):
        lens = sorted((rng.randint(1, 128) for _ in range(rng.randint(8, 12))), reverse=True)
        lens[0] += 1  # no leading run of equal lengths: every sequence is up for cutting
        got = group_bounds(lens, groups=4) or [0, len(lens)]
        best = min(work(lens, [0, *cuts, len(lens)]) for k in range(4)
                   for cuts in itertools.combinations(range(1, len(lens)), k))
        assert len(got) - 1 <= 4 and work(lens, got) == best


def test_a_batch_in_data_order_carries_its_longest_first_reordering():
    """Fine-tuning batches come in data order: their length groups are formed on the batch reordered
    longest first (each sequence kept whole and in order), and ``scatter`` undoes ``gather``."""
    lengths = [40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2]
    seq = PackedSeqInfo.from_seqlens(lengths)
    lf = seq.longest_first
    assert lf is not None and lf.layout.lengths == tuple(sorted(lengths, reverse=True))
    assert lf.layout.pad_groups and lf.layout.longest_first is None
    n = seq.num_tokens
    assert torch.equal(lf.gather[lf.scatter], torch.arange(n)) and torch.equal(lf.scatter[lf.gather], torch.arange(n))
    x = torch.arange(n)
    cu = seq.cu_seqlens.tolist()
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert torch.equal(x[lf.gather], torch.cat([x[cu[i]:cu[i + 1]] for i in by_length]))
    assert torch.equal(lf.layout.position_ids, seq.position_ids[lf.gather])
    # already longest first, too few sequences, or no grouping asked: nothing to reorder
    assert PackedSeqInfo.from_seqlens(sorted(lengths, reverse=True)).longest_first is None
    assert PackedSeqInfo.from_seqlens([3, 9, 5]).longest_first is None
    assert PackedSeqInfo.from_seqlens(lengths, pad_groups=0).longest_first is None
    moved = seq.to("cpu")
    assert moved.longest_first is not None and torch.equal(moved.longest_first.gather, lf.gather)


def test_fractional_lengths_are_refused_not_cut():
    with pytest.raises(ValueError, match=r"whole numbers, got \[3.7, 2\]"):
        PackedSeqInfo.from_seqlens([3.7, 2])
    assert PackedSeqInfo.from_seqlens([3.0, 2]).num_tokens == 5
