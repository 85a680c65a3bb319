"""MP3 position prediction ('mp3'): no position reaches the encoder, and the loss classifies positions."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmm.batch import FeatureInput, ImageInput, PackedBatch
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.core.packing import PackedSeqInfo
from mmm.model import build_model
from mmm.modalities.image.embedder import ImageEmbedder, ImageEncoder
from mmm.objectives.mim import patchify, unpatchify
from mmm.registry import EMBEDDERS, OBJECTIVES

D = 32


def _enc(**kw):
    return EncoderConfig(**{**dict(dim=D, depth=2, heads=2, mlp_hidden=64, norm_first=True, final_norm=True,
                                   norm_eps=1e-6, dropout=0.0, attn_dropout=0.0, attention="math"), **kw})


def _model(position="none", enc=None, **args):
    torch.manual_seed(0)
    emb = ImageEmbedder(D, image_size=16, patch_size=4, cls_token=True, position=position)
    return build_model(ModelConfig(encoder=enc or _enc()), [ObjectiveConfig("mp3", args=args)], {"image": emb})


def _batch(pixels, mask=None, drop_masked=True):
    b = pixels.shape[0]
    lengths = [1 + (16 if mask is None or not drop_masked else int((~m).sum())) for m in (mask if mask is not None
                                                                                          else [None] * b)]
    return PackedBatch(PackedSeqInfo.from_seqlens(lengths), {"image": ImageInput(pixels, mask, drop_masked)})


def test_registered_and_refuses_inputs_that_carry_positions():
    assert "mp3" in OBJECTIVES.list()
    for position in ("learned", "sincos"):
        with pytest.raises(ValueError, match="position: none"):
            _model(position)
    with pytest.raises(ValueError, match="relative_position"):
        _model(enc=_enc(relative_position="rotary"))
    emb = EMBEDDERS.create("audio", feature_dim=6, dim=D, max_len=16, position="learned")
    with pytest.raises(ValueError, match="model.audio.position: none"):
        build_model(ModelConfig(encoder=_enc()), [ObjectiveConfig("mp3", args={"modality": "audio"})], {"audio": emb})


@pytest.mark.parametrize("position,equivariant", [("none", True), ("sincos", False)])
def test_no_position_reaches_the_encoder(position, equivariant):
    """Shuffling an image's patches only shuffles the encoder's outputs: the encoder cannot tell where a patch is."""
    torch.manual_seed(0)
    emb = ImageEmbedder(D, image_size=16, patch_size=4, cls_token=True, position=position)
    model = build_model(ModelConfig(encoder=_enc()), [ObjectiveConfig("mae", args={"decoder_dim": 16, "decoder_depth": 1,
                                                                                   "decoder_heads": 2})], {"image": emb})
    pixels = torch.randn(1, 3, 16, 16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    shuffled = unpatchify(patchify(pixels, 4)[:, perm], 4, 3, (4, 4))  # cell i now shows the old cell perm[i]
    hidden = [model.encode(_batch(x)).view(17, D) for x in (pixels, shuffled)]
    same = torch.allclose(hidden[1][1:], hidden[0][1:][perm], atol=1e-5) and torch.allclose(hidden[1][0], hidden[0][0],
                                                                                             atol=1e-5)
    assert same == equivariant


def test_loss_is_a_classification_over_the_visible_patches_positions():
    model = _model()
    head = model.objectives["mp3"]
    assert head.num_positions == 16 and head.head.out_features == 16
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 1, 7, 9]] = True
    mask[1, [3, 15]] = True
    batch = _batch(torch.randn(2, 3, 16, 16), mask)
    hidden = model.encode(batch)
    out = head(hidden, batch)
    rows, labels = head.scored(batch)
    want_labels = torch.cat([(~mask[0]).nonzero().squeeze(1), (~mask[1]).nonzero().squeeze(1)])
    assert torch.equal(labels, want_labels) and out.count == 26  # [CLS] and hidden patches are not scored
    cls_rows = torch.tensor([0, 13])  # each image's [CLS] in the stream
    assert not (rows[:, None] == cls_rows).any()
    logits = head.head(hidden[rows])
    assert torch.allclose(out.loss, F.cross_entropy(logits, want_labels), atol=1e-6)
    assert abs(float(out.loss.detach()) - math.log(16)) < 0.1  # untrained: about uniform over the 16 cells
    # mask-token mode: every patch is in the stream, the hidden ones (mask embeddings) are not scored
    batch = _batch(batch.inputs["image"].pixels, mask, drop_masked=False)
    rows, labels = head.scored(batch)
    assert torch.equal(labels, want_labels) and head(model.encode(batch), batch).count == 26


def test_learns_positions_on_a_fixed_batch():
    model = _model()
    batch = _batch(torch.randn(4, 3, 16, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, out = model(batch)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_audio_tokens_predict_their_index():
    torch.manual_seed(0)
    emb = EMBEDDERS.create("audio", feature_dim=6, dim=D, max_len=12, position="none", dropout=0.0)
    model = build_model(ModelConfig(encoder=_enc()), [ObjectiveConfig("mp3", args={"modality": "audio", "hidden": 16})],
                        {"audio": emb})
    seq = PackedSeqInfo.from_seqlens([6, 4])
    mask = torch.tensor([0, 1, 0, 0, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    batch = PackedBatch(seq, {"audio": FeatureInput(torch.randn(10, 6), seq.position_ids, mask)})
    loss, out = model(batch)
    rows, labels = model.objectives["mp3"].scored(batch)
    assert torch.equal(labels, torch.tensor([0, 2, 3, 4, 0, 1, 3])) and out["mp3"].count == 7 and torch.isfinite(loss)


def test_an_encoder_without_positions_still_exports_to_timm():
    timm = pytest.importorskip("timm")  # noqa: F841
    from mmm.interop.timm import export_timm_vit, to_timm_model

    enc = ImageEncoder.build(_enc(), image_size=16, patch_size=4, position="none").eval()
    _, state = export_timm_vit(enc)
    assert torch.equal(state["pos_embed"], torch.zeros(1, 17, D))
    images = torch.randn(2, 3, 16, 16)
    ref = to_timm_model(enc).eval()
    with torch.no_grad():
        assert torch.allclose(ref.forward_features(images), enc(images), atol=1e-5)


@pytest.mark.parametrize("case", ["dropped", "mask_tokens", "no_mask", "audio"])
def test_scored_rows_at_a_host_count_equal_the_boolean_mask_ones(case):
    """The host's hidden count lets ``scored`` gather at a known size; the rows equal the nonzero path's."""
    from mmm.host_reads import HostReadDetector

    torch.manual_seed(1)
    if case == "audio":
        emb = EMBEDDERS.create("audio", feature_dim=6, dim=D, max_len=12, position="none", dropout=0.0)
        head = OBJECTIVES.create("mp3", dim=D, embedders={"audio": emb}, encoder_cfg=_enc(), modality="audio")
        seq = PackedSeqInfo.from_seqlens([6, 4])
        mask = torch.rand(10) < 0.4
        batch = PackedBatch(seq, {"audio": FeatureInput(torch.randn(10, 6), seq.position_ids, mask)})
        inp = batch.inputs["audio"]
    else:
        head = _model().objectives["mp3"]
        mask = None if case == "no_mask" else torch.rand(3, 16) < 0.5
        if mask is not None:
            mask[:, 0] = False
        batch = _batch(torch.randn(3, 3, 16, 16), mask, drop_masked=case == "dropped")
        inp = batch.inputs["image"]
    with HostReadDetector() as d:
        rows, labels = head.scored(batch)
    assert d.found == []
    known = inp.hidden_count
    inp.hidden_count = None  # the path without a host count: boolean masks and nonzero
    old_rows, old_labels = head.scored(batch)
    inp.hidden_count = known
    assert rows.tolist() == old_rows.tolist() and labels.tolist() == old_labels.tolist()
    assert rows.numel() > 0
