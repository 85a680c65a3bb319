"""ITM head and WRA (IPOT optimal transport) on hand-built packed batches."""
import pytest
import torch

from conftest import fit_head
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from mmm.batch import PackedBatch, PairTargets
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo
from mmm.objectives.optimal_transport import cosine_cost, ipot, ot_distance, pad_by_group
import mmm.objectives  # noqa: F401  (registers the objectives)
from mmm.registry import OBJECTIVES

D = 16


def _itm(**kw):
    torch.manual_seed(0)
    return OBJECTIVES.create("itm", dim=D, embedders={}, encoder_cfg=EncoderConfig(dim=D, heads=2), **kw)


def _batch(lengths=((3, 4), (2, 5), (4, 3), (3, 2)), labels=(1, 0, 1, 0)):
    """Pairs laid out as [CLS] text... image...; text/image token counts per pair from ``lengths``."""
    cls, text, text_pair, image, image_pair, seqlens, off = [], [], [], [], [], [], 0
    for i, (nt, ni) in enumerate(lengths):
        cls.append(off)
        text += range(off + 1, off + 1 + nt)
        text_pair += [i] * nt
        image += range(off + 1 + nt, off + 1 + nt + ni)
        image_pair += [i] * ni
        seqlens.append(1 + nt + ni)
        off += 1 + nt + ni
    t = PairTargets(torch.tensor(cls), torch.tensor(labels), torch.tensor(text), torch.tensor(text_pair),
                    torch.tensor(image), torch.tensor(image_pair))
    return PackedBatch(PackedSeqInfo.from_seqlens(seqlens), {}, {"itm": t}), off


def test_itm_loss_grads_and_learning():
    head = _itm()
    batch, n = _batch()
    hidden = torch.nn.Parameter(torch.randn(n, D))
    out = head(hidden, batch)
    assert torch.isfinite(out.loss) and out.count == 4 and set(out.metrics) == {"acc"}
    out.loss.backward()
    cls = batch.targets["itm"].cls_positions
    others = torch.ones(n, dtype=torch.bool)
    others[cls] = False
    assert hidden.grad[cls].abs().sum() > 0 and hidden.grad[others].abs().sum() == 0  # only [CLS] feeds ITM
    assert all(p.grad is not None for p in head.parameters())
    first = out.loss.item()
    out = fit_head(head, hidden, batch)
    assert out.loss.item() < 0.5 * first and float(out.metrics["acc"]) == 1.0


def test_itm_zero_targets_connected():
    head = _itm(wra_weight=0.1)
    hidden = torch.randn(5, D, requires_grad=True)
    batch = PackedBatch(PackedSeqInfo.from_seqlens([5]), {})
    out = head(hidden, batch)
    assert out.loss.item() == 0.0 and out.loss.requires_grad and out.count == 0 and set(out.metrics) == {"acc", "wra"}
    out.loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_wra_equals_per_pair_ot_and_uniter_sign():
    head = _itm(wra_weight=0.5)
    batch, n = _batch()
    t = batch.targets["itm"]
    hidden = torch.nn.Parameter(torch.randn(n, D))
    out = head(hidden, batch)
    per_pair = []
    for i in range(4):  # the unbatched reference: one OT problem per pair, no padding
        x = hidden[t.text_positions[t.text_pair == i]][None]
        y = hidden[t.image_positions[t.image_pair == i]][None]
        d, _ = ot_distance(cosine_cost(x, y), torch.ones(x.shape[:2], dtype=torch.bool),
                           torch.ones(y.shape[:2], dtype=torch.bool))
        per_pair.append(d[0])
    per_pair = torch.stack(per_pair)
    assert torch.allclose(head.wra(hidden, t), per_pair, atol=1e-5)
    expected_ot = (per_pair[t.labels == 1].sum() - per_pair[t.labels == 0].sum()) / 4
    assert torch.allclose(out.metrics["wra"], expected_ot, atol=1e-5)
    ce = F.cross_entropy(head.classifier(torch.tanh(head.pooler(hidden[t.cls_positions]))), t.labels)
    assert torch.allclose(out.loss, ce + 0.5 * expected_ot, atol=1e-5)
    out.loss.backward()
    assert hidden.grad[t.text_positions].abs().sum() > 0 and hidden.grad[t.image_positions].abs().sum() > 0


def test_wra_training_pulls_positive_pairs_together():
    head = _itm(wra_weight=1.0)
    batch, n = _batch(labels=(1, 1, 1, 1))
    hidden = torch.nn.Parameter(torch.randn(n, D))
    opt = torch.optim.Adam([hidden], lr=2e-2)
    first = float(head(hidden, batch).metrics["wra"])
    for _ in range(30):
        opt.zero_grad()
        out = head(hidden, batch)
        out.loss.backward()
        opt.step()
    assert float(out.metrics["wra"]) < 0.5 * first


@pytest.mark.parametrize("n", [4, 7])
def test_ipot_reaches_the_optimal_assignment(n):
    g = torch.Generator().manual_seed(n)
    cost = torch.rand(3, n, n, generator=g)
    mask = torch.ones(3, n, dtype=torch.bool)
    plan = ipot(cost, mask, mask, beta=0.5, iterations=300)
    for b in range(3):
        r, c = linear_sum_assignment(cost[b].numpy())
        best = float(cost[b][r, c].sum()) / n  # uniform marginals, n == m: OT = assignment / n (Birkhoff)
        assert float((cost[b] * plan[b]).sum()) == pytest.approx(best, abs=1e-4)
    assert torch.allclose(plan.sum(-1), torch.full((3, n), 1.0 / n), atol=1e-5)
    assert torch.allclose(plan.sum(-2), torch.full((3, n), 1.0 / n), atol=1e-5)
    # UNITER's settings (50 iterations) are already close
    plan50 = ipot(cost, mask, mask)
    r, c = linear_sum_assignment(cost[0].numpy())
    assert float((cost[0] * plan50[0]).sum()) == pytest.approx(float(cost[0][r, c].sum()) / n, rel=0.05)


def test_ipot_padding_is_invisible():
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(1, 3, 5, generator=g)
    full = ipot(cost, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool))
    padded_cost = torch.rand(1, 6, 8, generator=g)
    padded_cost[:, :3, :5] = cost
    xm = torch.zeros(1, 6, dtype=torch.bool)
    xm[:, :3] = True
    ym = torch.zeros(1, 8, dtype=torch.bool)
    ym[:, :5] = True
    plan = ipot(padded_cost, xm, ym)
    assert torch.allclose(plan[:, :3, :5], full, atol=1e-6) and plan[:, 3:].abs().sum() == 0
    assert plan[:, :, 5:].abs().sum() == 0
    with pytest.raises(ValueError, match="beta"):
        ipot(cost, xm[:, :3], ym[:, :5], beta=0.0)


def test_pad_by_group_keeps_order():
    x = torch.arange(6.0)[:, None]
    group = torch.tensor([1, 0, 1, 2, 0, 1])
    padded, mask = pad_by_group(x, group, 4)
    assert padded.shape == (4, 3, 1)
    assert padded[0, :2, 0].tolist() == [1.0, 4.0] and padded[1, :, 0].tolist() == [0.0, 2.0, 5.0]
    assert mask.sum(-1).tolist() == [2, 3, 1, 0]


def test_itm_rejects_bad_args():
    with pytest.raises(ValueError, match="wra_weight"):
        _itm(wra_weight=-1.0)
    with pytest.raises(ValueError, match="ot_iterations"):
        _itm(ot_iterations=0)


def test_pad_by_group_at_a_host_known_longest_group_reads_nothing_back():
    from mmm.batch import PairTargets
    from mmm.host_reads import HostReadDetector

    x, group = torch.arange(6.0)[:, None], torch.tensor([1, 0, 1, 2, 0, 1])
    pairs = PairTargets(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long), torch.arange(6), group,
                        torch.arange(2), torch.tensor([3, 3]))
    assert pairs.longest == (3, 2)  # counted on the host at construction
    with HostReadDetector() as d:
        padded, mask = pad_by_group(x, group, 4, longest=pairs.longest[0])
    assert d.found == []
    old_padded, old_mask = pad_by_group(x, group, 4)
    assert torch.equal(padded, old_padded) and torch.equal(mask, old_mask)
