"""top1_accuracy: argmax accuracy from the row maximum (ties count as correct)."""
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
