"""LightCLIP-style soft itc targets: identical captions share the positive mass, progressive softening
of the negatives, parity with CLIP's loss when both are off, step counter saved with the head."""
import pytest
import torch
import torch.nn.functional as F

from mmm.batch import ContrastiveTargets, PackedBatch, TokenInput
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo
from mmm.objectives.contrastive import caption_keys, soft_targets
import mmm.objectives  # noqa: F401  (registers the objectives)
from mmm.registry import OBJECTIVES

D = 16


def _itc(**kw):
    torch.manual_seed(0)
    return OBJECTIVES.create("itc", dim=D, embedders={}, encoder_cfg=EncoderConfig(dim=D, heads=2), **kw)


def _batch(captions, patches=3):
    """B captions (token ids, each its own sequence), then B images of ``patches`` tokens (the itc layout)."""
    b = len(captions)
    t_len = [len(c) for c in captions]
    seq = PackedSeqInfo.from_seqlens(t_len + [patches] * b)
    starts = seq.cu_seqlens[:-1].long()
    n_text = sum(t_len)
    image_pos = torch.arange(n_text, n_text + b * patches)
    owner = torch.arange(b).repeat_interleave(patches)
    ids = torch.tensor([i for c in captions for i in c])
    text = TokenInput(ids, torch.cat([torch.arange(n) for n in t_len]), torch.arange(n_text))
    t = ContrastiveTargets(starts[:b], image_pos, owner)
    return PackedBatch(seq, {"text": text}, {"itc": t}), n_text + b * patches


# captions 0, 2 and 4 are the same text; 1 and 3 differ from everything (3 is a prefix of 0's text)
CAPTIONS = [[2, 7, 9, 3], [2, 8, 9, 3], [2, 7, 9, 3], [2, 7, 9], [2, 7, 9, 3]]


def test_caption_keys_match_exact_comparison():
    batch, _ = _batch(CAPTIONS)
    keys = caption_keys(batch, batch.targets["itc"].text_positions)
    same = keys[:, None] == keys[None, :]
    exact = torch.tensor([[a == b for b in CAPTIONS] for a in CAPTIONS])
    assert torch.equal(same, exact)
    g = torch.Generator().manual_seed(1)  # many random captions: no false match
    caps = [torch.randint(0, 50, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(60)]
    batch, _ = _batch(caps)
    keys = caption_keys(batch, batch.targets["itc"].text_positions)
    assert torch.equal(keys[:, None] == keys[None, :], torch.tensor([[a == b for b in caps] for a in caps]))


def test_caption_keys_do_not_depend_on_the_batch():
    """Keys are all-gathered and compared across ranks: the same caption in batches whose longest sequence differs
    (images of 3 and 30 tokens) must get the same key; a length term weighted by base**(max_seqlen + 1) broke that."""
    short, _ = _batch(CAPTIONS, patches=3)
    long, _ = _batch(CAPTIONS[::-1], patches=30)
    assert short.seq.max_seqlen != long.seq.max_seqlen
    k_short = caption_keys(short, short.targets["itc"].text_positions)
    k_long = caption_keys(long, long.targets["itc"].text_positions)
    assert torch.equal(k_short, k_long.flip(0))


def test_soft_targets_rows():
    same = torch.tensor([[True, False, True, False], [False, True, False, False]])
    t = soft_targets(same, 0.0)
    assert torch.allclose(t[0], torch.tensor([0.5, 0.0, 0.5, 0.0])) and torch.allclose(t[1], torch.tensor([0., 1., 0., 0.]))
    t = soft_targets(same, 0.3)
    assert torch.allclose(t[0], torch.tensor([0.35, 0.15, 0.35, 0.15]))
    assert torch.allclose(t[1], torch.tensor([0.1, 0.7, 0.1, 0.1]))
    assert torch.allclose(t.sum(1), torch.ones(2))
    # a row whose every column is a positive keeps all its mass there
    assert torch.allclose(soft_targets(torch.ones(1, 3, dtype=torch.bool), 0.3), torch.full((1, 3), 1 / 3))


def test_duplicate_captions_loss_by_hand():
    head = _itc(embed_dim=8, duplicate_captions=True)
    batch, n = _batch(CAPTIONS)
    hidden = torch.randn(n, D)
    out = head(hidden, batch)
    img, txt = head.embed_pairs(hidden, batch.targets["itc"])
    logits = (1 / 0.07) * img @ txt.T  # (B, B) image rows, caption columns
    same = torch.tensor([[a == b for b in CAPTIONS] for a in CAPTIONS]).float()
    target = same / same.sum(1, keepdim=True)
    expected = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # differs from CLIP's one-hot loss on this batch (three copies of one caption)
    one_hot = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    assert not torch.allclose(out.loss, one_hot, atol=1e-3)
    assert float(out.metrics["smoothing"]) == 0.0


def test_off_is_clip_and_zero_smoothing_is_clip():
    batch, n = _batch([[2, 7, 9, 3], [2, 8, 9, 3], [2, 5, 3], [2, 6, 6, 6, 3]])
    hidden = torch.randn(n, D)
    ref = _itc(embed_dim=8)(hidden, batch).loss
    soft = _itc(embed_dim=8, label_smoothing=0.2, smoothing_steps=10)  # step 0 of the ramp: nothing moved yet
    assert torch.allclose(soft(hidden, batch).loss, ref, atol=1e-6)
    unique = _itc(embed_dim=8, duplicate_captions=True)  # all captions differ: one-hot targets
    assert torch.allclose(unique(hidden, batch).loss, ref, atol=1e-6)


def test_smoothing_schedule_and_state():
    head = _itc(label_smoothing=0.2, smoothing_steps=4)
    values = []
    for _ in range(6):
        values.append(round(float(head.smoothing()), 6))
        head.after_optimizer_step(None)
    assert values == [0.0, 0.05, 0.1, 0.15, 0.2, 0.2]
    assert "steps" in head.state_dict() and int(head.state_dict()["steps"]) == 6
    fresh = _itc(label_smoothing=0.2, smoothing_steps=4)
    fresh.load_state_dict(head.state_dict())
    assert float(fresh.smoothing()) == pytest.approx(0.2)
    assert "steps" not in _itc().state_dict()  # the plain CLIP head's state is unchanged
    constant = _itc(label_smoothing=0.1)
    assert float(constant.smoothing()) == pytest.approx(0.1)


def test_smoothed_loss_by_hand():
    head = _itc(embed_dim=8, duplicate_captions=True, label_smoothing=0.2)
    batch, n = _batch(CAPTIONS)
    hidden = torch.randn(n, D)
    img, txt = head.embed_pairs(hidden, batch.targets["itc"])
    logits = (1 / 0.07) * img @ txt.T
    same = torch.tensor([[a == b for b in CAPTIONS] for a in CAPTIONS]).float()
    target = 0.8 * same / same.sum(1, keepdim=True) + 0.2 * (1 - same) / (1 - same).sum(1, keepdim=True)
    expected = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(head(hidden, batch).loss, expected, atol=1e-5)


@pytest.mark.parametrize("kw, field", [({"label_smoothing": 1.0}, "label_smoothing"),
                                       ({"label_smoothing": -0.1}, "label_smoothing"),
                                       ({"smoothing_steps": -1}, "smoothing_steps"),
                                       ({"duplicate_captions": "yes"}, "duplicate_captions")])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        _itc(**kw)


def test_duplicate_captions_needs_caption_ids():
    head = _itc(duplicate_captions=True)
    batch, n = _batch(CAPTIONS)
    batch.inputs.pop("text")
    with pytest.raises(ValueError, match="token ids"):
        head(torch.randn(n, D), batch)
