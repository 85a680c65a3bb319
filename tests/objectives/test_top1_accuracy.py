"""top1_accuracy: argmax accuracy from the row maximum (ties count as correct; with share_ties, 1/ties)."""
import pytest
import torch

from mmm.objectives.base import top1_accuracy


def test_matches_argmax_on_untied_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 97, generator=g)
    labels = torch.randint(0, 97, (300,), generator=g)
    labels[:100] = logits[:100].argmax(-1)  # a third right for sure, the rest mostly wrong
    expected = (logits.argmax(-1) == labels).float().mean()
    assert torch.equal(top1_accuracy(logits, labels), expected)
    assert 0.33 < float(expected) < 0.4


def test_tie_counts_as_correct_and_result_is_detached():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([2, 1])  # row 0: tied top score (argmax would say 1); row 1: wrong
    acc = top1_accuracy(logits, labels)
    assert float(acc) == 0.5
    assert not acc.requires_grad


def test_shared_ties_count_a_fraction_and_a_collapsed_head_scores_one_over_v():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([2, 0, 1])  # tied with one other: 1/2; right alone: 1; three-way tie: 1/3
    assert float(top1_accuracy(logits, labels, share_ties=True)) == pytest.approx((0.5 + 1 + 1 / 3) / 3)
    g = torch.Generator().manual_seed(0)
    untied = torch.randn(200, 31, generator=g)
    labels = torch.randint(0, 31, (200,), generator=g)
    assert torch.equal(top1_accuracy(untied, labels, share_ties=True), top1_accuracy(untied, labels))
    collapsed = torch.zeros(64, 50)
    assert float(top1_accuracy(collapsed, labels[:64], share_ties=True)) == pytest.approx(1 / 50)


def test_the_mlm_head_shares_ties_when_evaluating_only():
    """evaluate_mlm read the head's accuracy with ties counted as correct: a collapsed head (all logits equal)
    scored held-out accuracy 1.0 against a loss of exactly ln V."""
    from mmm.batch import PackedBatch, TokenTargets
    from mmm.config import EncoderConfig
    from mmm.core.packing import PackedSeqInfo
    from mmm.objectives.mlm import MaskedLanguageModeling

    embedder = torch.nn.Module()
    embedder.tokens = torch.nn.Embedding(50, 8)
    head = MaskedLanguageModeling(8, {"text": embedder}, EncoderConfig(dim=8, heads=2), tie_weights=False)
    for p in head.head.parameters():
        torch.nn.init.zeros_(p)  # every logit 0
    seq = PackedSeqInfo.from_seqlens([6, 4])
    positions, labels = torch.tensor([1, 3, 7]), torch.tensor([5, 9, 11])
    batch = PackedBatch(seq, {}, {"text": TokenTargets(positions, labels)})
    hidden = torch.randn(10, 8)
    assert float(head.eval()(hidden, batch).metrics["acc"]) == pytest.approx(1 / 50)
    assert float(head.train()(hidden, batch).metrics["acc"]) == 1.0  # training logs: the cheap form
