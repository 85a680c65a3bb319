import pytest
import torch

from mmm.core.packing import PackedSeqInfo, pack_padded


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
