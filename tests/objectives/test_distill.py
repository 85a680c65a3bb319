"""Frozen-teacher distillation ('distill'): the mechanics.

The teacher (a saved encoder folder here; any load_encoder source) gets no gradient and is in neither
the state_dict nor the optimizer; the loss reads visible tokens only (text: not the MLM targets;
images: [CLS] and unmasked patches, also when the teacher reads every patch of a drop-masked batch);
a student initialised from its teacher starts at zero loss on the masked input; widths may differ.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmm.batch import ImageInput, PackedBatch, pack_masked
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.core.packing import PackedSeqInfo
from mmm.encoders import TextEncoder, save_encoder
from mmm.masking.base import MaskedTokens
from mmm.model import build_model
from mmm.modalities.image.embedder import ImageEmbedder, ImageEncoder
import mmm.objectives.distill  # noqa: F401  (registers "distill")
from mmm.registry import EMBEDDERS
from mmm.warm_start import warm_start

V, D = 40, 32


def _enc(dim=D, **kw):
    base = dict(dim=dim, depth=2, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    return EncoderConfig(**{**base, **kw})


@pytest.fixture
def text_teacher(tmp_path):
    torch.manual_seed(5)
    enc = TextEncoder.from_config(ModelConfig(encoder=_enc()), vocab_size=V)
    with torch.no_grad():  # a trained-looking teacher: not the builder's init
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_encoder(enc, tmp_path / "teacher")


def _text_model(teacher, dim=D, **args):
    torch.manual_seed(0)
    emb = EMBEDDERS.create("text", vocab_size=V, dim=dim, max_len=128, dropout=0.0, pad_id=0)
    spec = teacher if isinstance(teacher, dict) else str(teacher)
    objectives = [ObjectiveConfig("mlm", args={"modality": "text"}),
                  ObjectiveConfig("distill", weight=0.5, args={"teacher": spec, **args})]
    return build_model(ModelConfig(encoder=_enc(dim)), objectives, {"text": emb})


def _text_batch():
    """Two sequences; positions 1, 2 of the first and 1 of the second are hidden (originals 11, 12, 13)."""
    a = MaskedTokens(np.array([1, 3, 3, 9, 2]), np.array([1, 2]), np.array([11, 12]))
    b = MaskedTokens(np.array([1, 3, 8, 2]), np.array([1]), np.array([13]))
    return pack_masked([a, b])


def test_student_initialised_from_teacher_starts_at_zero(text_teacher):
    model = _text_model(text_teacher)
    batch = _text_batch()
    before = model(batch)[1]["distill"].loss.detach()
    assert float(before) > 1e-3  # a fresh student differs from the teacher
    warm_start(model, text_teacher, verbose=False)
    out = model(batch)[1]
    assert float(out["distill"].loss.detach()) < 1e-10 and float(out["distill"].metrics["cosine"]) == pytest.approx(1.0)
    assert float(out["mlm"].loss.detach()) > 0  # the masked loss is there beside it
    assert out["distill"].count == 6  # 9 tokens, 3 of them MLM targets
    full = _text_model(text_teacher, teacher_input="full")
    warm_start(full, text_teacher, verbose=False)
    assert float(full(batch)[1]["distill"].loss) > 1e-4  # the teacher saw the unmasked context


def test_teacher_gets_no_gradient_and_is_not_saved(text_teacher):
    model = _text_model(text_teacher)
    head = model.objectives["distill"]
    teacher = head.teacher.module
    total, _ = model(_text_batch())
    total.backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not any("teacher" in k for k in model.state_dict())
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in teacher.parameters())
    assert head.proj is None and list(head.parameters()) == []  # equal widths: nothing trained in the head
    model.train()
    assert not teacher.training
    assert model.embedders["text"].tokens.weight.grad is not None


def test_loss_reads_visible_tokens_only(text_teacher):
    model = _text_model(text_teacher)
    head = model.objectives["distill"]
    batch = _text_batch()
    target = head.teacher_states(batch)  # (N, D): the teacher on the masked input
    hidden = target.clone()
    hidden[batch.targets["text"].positions] += 5.0  # the hidden (MLM) tokens are not scored
    assert float(head(hidden, batch).loss) == 0.0
    hidden[0, :] += 1.0  # a visible token ([CLS] of the first sequence)
    expected = (1.0 / 6)  # one of six visible tokens off by 1 in every channel: mean over channels = 1
    assert float(head(hidden, batch).loss) == pytest.approx(expected, rel=1e-5)
    cos_head = _text_model(text_teacher, loss="cosine").objectives["distill"]
    h = torch.randn_like(target)
    visible = torch.ones(len(h), dtype=torch.bool)
    visible[batch.targets["text"].positions] = False
    by_hand = (1 - F.cosine_similarity(h[visible], target[visible], dim=-1)).mean()
    assert float(cos_head(h, batch).loss) == pytest.approx(float(by_hand), rel=1e-5)


def test_wider_teacher_gets_a_learned_projection(text_teacher):
    model = _text_model(text_teacher, dim=16, teacher_dim=D)
    head = model.objectives["distill"]
    assert head.proj is not None and head.proj.weight.shape == (D, 16)
    out = model(_text_batch())[1]["distill"]
    out.loss.backward()
    assert head.proj.weight.grad is not None and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="set args.teacher_dim: 32"):
        _text_model(text_teacher, dim=16)(_text_batch())


@pytest.fixture
def image_teacher(tmp_path):
    from mmm.modalities.image.embedder import ImageEncoderConfig

    torch.manual_seed(7)
    cfg = ImageEncoderConfig(encoder=_enc(norm_first=True, final_norm=True, norm_eps=1e-6), image_size=16,
                             patch_size=4, position="sincos")
    return save_encoder(ImageEncoder.from_config(cfg), tmp_path / "image_teacher")


def _image_head(teacher, **args):
    from mmm.registry import OBJECTIVES

    emb = ImageEmbedder(D, image_size=16, patch_size=4, cls_token=True, position="sincos")
    return OBJECTIVES.create("distill", dim=D, embedders={"image": emb}, encoder_cfg=_enc(),
                             teacher=str(teacher), modality="image", **args)


def _image_batch(drop_masked):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    mask[1, [0, 15]] = True
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    lengths = [1 + int((~m).sum() if drop_masked else m.numel()) for m in mask]
    return PackedBatch(PackedSeqInfo.from_seqlens(lengths), {"image": ImageInput(pixels, mask, drop_masked)}), mask


def test_image_mask_token_mode_scores_cls_and_visible_patches(image_teacher):
    head = _image_head(image_teacher)
    batch, mask = _image_batch(drop_masked=False)
    rows, teacher_rows = head.visible_rows(batch)
    assert torch.equal(rows, teacher_rows)
    expected = [0] + [1 + p for p in range(16) if p not in (1, 5, 6)] + [17] + [18 + p for p in range(16) if p not in (0, 15)]
    assert rows.tolist() == expected
    hidden = head.teacher_states(batch).clone()
    hidden[[2, 6, 7, 17 + 1, 17 + 16]] += 3.0  # the hidden patches
    assert float(head(hidden, batch).loss) == 0.0


def test_drop_masked_full_teacher_aligns_visible_slots(image_teacher):
    head = _image_head(image_teacher, teacher_input="full")
    batch, mask = _image_batch(drop_masked=True)
    rows, teacher_rows = head.visible_rows(batch)
    assert rows.tolist() == list(range(batch.num_tokens))  # every student token is visible
    full = head.teacher_states(batch)  # (2 * 17, D): the teacher read every patch
    assert full.shape[0] == 34
    expected = [0] + [1 + p for p in range(16) if p not in (1, 5, 6)] + [17] + [18 + p for p in range(16) if p not in (0, 15)]
    assert teacher_rows.tolist() == expected
    assert float(head(full[teacher_rows], batch).loss) == 0.0


def test_bad_teachers_are_refused(text_teacher, tmp_path):
    with pytest.raises(ValueError, match="vocabulary of 40 ids but the student 41"):
        emb = EMBEDDERS.create("text", vocab_size=V + 1, dim=D, max_len=16, dropout=0.0, pad_id=0)
        build_model(ModelConfig(encoder=_enc()), [ObjectiveConfig("distill", args={"teacher": str(text_teacher)})],
                    {"text": emb}).objectives["distill"].teacher
    missing = _text_model(tmp_path / "nowhere")  # building the head reads no file
    with pytest.raises(FileNotFoundError, match="does not exist"):
        missing(_text_batch())
    with pytest.raises(ValueError, match="teacher_input"):
        _text_model(text_teacher, teacher_input="clean")
    with pytest.raises(ValueError, match="unknown teacher keys"):
        _text_model({"path": str(text_teacher), "model": "x"})
    with pytest.raises(ValueError, match="args.teacher is required"):
        emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0)
        build_model(ModelConfig(encoder=_enc()), [ObjectiveConfig("distill")], {"text": emb})


@pytest.mark.parametrize("case", ["text", "image-mask-tokens", "image-dropped-full-teacher"])
def test_a_distillation_step_reads_nothing_back(text_teacher, image_teacher, case):
    """The visible rows come from host counts (the MLM targets' count, the image's hidden_count), as the GPU path
    needs; the rows equal the boolean-mask ones the tests above spell out."""
    from mmm.host_reads import HostReadDetector

    if case == "text":
        model = _text_model(text_teacher)
        model.objectives["distill"].teacher  # loaded from its file before the step, as on the first step of a run
        batch = _text_batch()
        with HostReadDetector() as d:
            loss, _ = model(batch)
            loss.backward()
        assert model.objectives["distill"].visible_rows(batch)[0].tolist() == [0, 3, 4, 5, 7, 8]
    else:
        full = case == "image-dropped-full-teacher"
        head = _image_head(image_teacher, **({"teacher_input": "full"} if full else {}))
        head.teacher
        batch, _ = _image_batch(drop_masked=full)
        hidden = torch.randn(batch.num_tokens, D, requires_grad=True)
        with HostReadDetector() as d:
            head(hidden, batch).loss.backward()
    assert d.found == []
