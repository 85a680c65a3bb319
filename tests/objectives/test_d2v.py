"""data2vec-style self-distillation ('d2v'): the mechanics.

The EMA follows its rule and schedule, in fp32 under a bf16 student; the teacher starts as the
student, gets no gradient and is not in the optimizer; targets are the teacher's normalised top-K
block outputs on the *unmasked* input, at the hidden positions only; text, drop-masked and
mask-token images and audio frames all train; a resumed run continues the EMA exactly.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmm.batch import FeatureInput, ImageInput, PackedBatch, pack_masked
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig, OptimConfig
from mmm.core.packing import PackedSeqInfo
from mmm.masking.base import MaskedTokens
from mmm.model import build_model
from mmm.modalities.image.embedder import ImageEmbedder
from mmm.objectives.d2v import ema_decay_at, instance_norm_packed
from mmm.optim import build_optimizer
from mmm.registry import EMBEDDERS, OBJECTIVES

V, D = 40, 32


def _enc(**kw):
    base = dict(dim=D, depth=3, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0, attention="math")
    return EncoderConfig(**{**base, **kw})


def _text_model(seed=0, **args):
    torch.manual_seed(seed)
    emb = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0)
    return build_model(ModelConfig(encoder=_enc()), [ObjectiveConfig("d2v", args={"top_k": 2, **args})],
                       {"text": emb})


def _text_batch(mask_ids=(3, 3, 3)):
    """Two sequences; positions 1, 2 of the first and 1 of the second are hidden (originals 11, 12, 13)."""
    a = MaskedTokens(np.array([1, mask_ids[0], mask_ids[1], 9, 2]), np.array([1, 2]), np.array([11, 12]))
    b = MaskedTokens(np.array([1, mask_ids[2], 8, 2]), np.array([1]), np.array([13]))
    return pack_masked([a, b])


def _image_model(drop_masked=True, seed=0, **args):
    torch.manual_seed(seed)
    enc = _enc(norm_first=True, final_norm=True, norm_eps=1e-6)
    emb = ImageEmbedder(D, image_size=16, patch_size=4, cls_token=True, position="sincos")
    depth = {"decoder_depth": 1, "decoder_dim": 16, "decoder_heads": 2} if drop_masked else {}
    obj = ObjectiveConfig("d2v", args={"modality": "image", "top_k": 2, **depth, **args})
    return build_model(ModelConfig(encoder=enc), [obj], {"image": emb})


def _image_batch(mask, drop_masked, seed=0, pixels=None):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(mask.shape[0], 3, 16, 16, generator=g) if pixels is None else pixels
    lengths = [1 + int((~m).sum() if drop_masked else m.numel()) for m in mask]
    return PackedBatch(PackedSeqInfo.from_seqlens(lengths), {"image": ImageInput(pixels, mask, drop_masked)})


def _mask():
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 3, 5, 6, 9, 15]] = True
    mask[1, [1, 2, 4, 8, 10, 11, 12, 14]] = True
    return mask


def _student(model):
    head = model.objectives["d2v"]
    return dict(head._student(model)[0])


def _teacher(model):
    return dict(model.objectives["d2v"].teacher.tracked())


def test_registered_and_decay_schedule():
    assert "d2v" in OBJECTIVES.list()
    assert ema_decay_at(0, 0.999, 0.9999, 100) == 0.999
    assert ema_decay_at(50, 0.999, 0.9999, 100) == pytest.approx(0.99945)
    assert ema_decay_at(100, 0.999, 0.9999, 100) == 0.9999
    assert ema_decay_at(10**6, 0.999, 0.9999, 100) == 0.9999
    assert ema_decay_at(0, 0.9, 0.99, 0) == 0.99  # no ramp
    with pytest.raises(ValueError, match="top_k"):
        _text_model(top_k=4)  # more blocks than the encoder has


def test_teacher_starts_as_the_student_and_follows_the_ema_rule():
    model = _text_model(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_steps=2)
    head = model.objectives["d2v"]
    assert not bool(head.teacher.initialized)
    model(_text_batch())  # the first step fills the teacher
    for name, t in _teacher(model).items():
        assert torch.equal(t, _student(model)[name]), name
    for step, decay in enumerate([0.9, 0.945, 0.99, 0.99]):
        before = {k: v.clone().double() for k, v in _teacher(model).items()}
        with torch.no_grad():  # stand-in for an optimizer step
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        assert head.current_decay() == pytest.approx(decay)
        model.after_optimizer_step()
        student = _student(model)
        for name, t in _teacher(model).items():
            want = decay * before[name] + (1 - decay) * student[name].double()
            assert torch.allclose(t.double(), want, rtol=0, atol=1e-6), name
        assert int(head.teacher.updates) == step + 1


def test_ema_is_fp32_under_a_bf16_student():
    model = _text_model(ema_decay=0.9999, ema_end_decay=0.9999)
    batch = _text_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: autocast over fp32 weights
        loss, out = model(batch)
    assert torch.isfinite(loss) and out["d2v"].count == 3
    model.to(torch.bfloat16)  # bf16-true: the whole model cast
    head = model.objectives["d2v"]
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if ".teacher." not in n)
    assert all(t.dtype == torch.float32 for t in _teacher(model).values())
    assert head.teacher.modality_vector.dtype == torch.float32
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # a 5e-6 EMA increment: below bf16's half-ulp for weights above about 1e-3
    before = {k: v.clone() for k, v in _teacher(model).items()}
    model.after_optimizer_step()
    moved_fp32, moved_bf16, total = 0, 0, 0
    for name, t in _teacher(model).items():
        s = _student(model)[name].float()
        want = 0.9999 * before[name].double() + 0.0001 * s.double()
        assert torch.allclose(t.double(), want, rtol=0, atol=1e-6), name
        if t.ndim == 2:  # weight matrices: the same update done in bf16 is mostly lost to rounding
            in_bf16 = before[name].bfloat16() * 0.9999 + s.bfloat16() * 0.0001
            moved_bf16 += int((in_bf16 != before[name].bfloat16()).sum())
            moved_fp32 += int((t != before[name]).sum())
            total += t.numel()
    assert moved_fp32 > 0.99 * total and moved_bf16 < 0.2 * total
    loss, out = model(batch)  # a bf16 student still trains against fp32 targets
    assert torch.isfinite(loss)
    assert head.targets(batch).dtype == torch.float32


def test_teacher_gets_no_gradient_and_is_not_in_the_optimizer():
    model = _text_model()
    head = model.objectives["d2v"]
    loss, _ = model(_text_batch())
    loss.backward()
    teacher = list(head.teacher.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    assert all(p.grad is not None for p in model.encoder.parameters())
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in teacher}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in _teacher(model).items()}
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in _teacher(model).items())  # only the EMA moves it
    model.train()
    assert not head.teacher.training and not head.teacher.encoder.training and model.encoder.training


def _block_outputs_by_hooks(encoder, x, seq):
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in encoder.blocks]
    encoder(x, seq)
    for h in hooks:
        h.remove()
    return outs


def test_text_targets_are_the_teachers_top_k_on_unmasked_ids_at_hidden_positions():
    model = _text_model()
    head = model.objectives["d2v"]
    batch = _text_batch()
    model(batch)
    target = head.targets(batch)
    positions = batch.targets["text"].positions
    assert target.shape == (3, D)
    # reference: the teacher on the original ids, its last 2 blocks (forward hooks), layer-normed, averaged
    original = batch.inputs["text"].ids.index_copy(0, positions, batch.targets["text"].labels)
    x = head.teacher.embedder(original, batch.inputs["text"].position_ids)
    outs = _block_outputs_by_hooks(head.teacher.encoder, x, batch.seq)[-2:]
    want = sum(F.layer_norm(o[positions], (D,)) for o in outs) / 2
    assert torch.allclose(target, want, atol=1e-5)
    # the teacher reads the unmasked input: how the student's input was corrupted does not matter ...
    assert torch.equal(head.targets(_text_batch(mask_ids=(7, 3, 30))), target)
    # ... and the loss scores hidden positions only: no gradient reaches the visible tokens' states
    hidden = torch.randn(batch.num_tokens, D, requires_grad=True)
    head(hidden, batch).loss.backward()
    scored = hidden.grad.abs().sum(1) > 0
    want_scored = torch.zeros(batch.num_tokens, dtype=torch.bool)
    want_scored[positions] = True
    assert torch.equal(scored, want_scored)


def test_instance_norm_is_per_sequence_and_channel():
    seq = PackedSeqInfo.from_seqlens([5, 3])
    x = torch.randn(8, 4) * 3 + 1
    out = instance_norm_packed(x, seq)
    for a, b in ((0, 5), (5, 8)):
        want = F.instance_norm(x[a:b].T[None], eps=1e-5)[0].T
        assert torch.allclose(out[a:b], want, atol=1e-5)
    model = _text_model(target_norm="instance", final_norm=True)
    model(_text_batch())
    target = model.objectives["d2v"].targets(_text_batch())
    assert torch.allclose(target.mean(1), torch.zeros(3), atol=1e-5)  # final_norm: each target has zero mean


def test_drop_masked_image_student_with_a_grid_decoder():
    model = _image_model(drop_masked=True)
    head = model.objectives["d2v"]
    mask = _mask()
    batch = _image_batch(mask, True)
    loss, out = model(batch)
    assert torch.isfinite(loss) and out["d2v"].count == int(mask.sum()) == 14
    # the teacher saw every patch: the targets are its blocks on the full image, at the hidden patches
    tokens, _ = head.teacher.embedder(batch.inputs["image"].pixels)
    outs = _block_outputs_by_hooks(head.teacher.encoder, tokens, PackedSeqInfo.from_seqlens([17, 17]))[-2:]
    want = sum(F.layer_norm(o.view(2, 17, D)[:, 1:][mask], (D,)) for o in outs) / 2
    assert torch.allclose(head.targets(batch), want, atol=1e-5)
    # pixels of a hidden patch reach the targets (teacher), never the student's encoder input
    pixels = batch.inputs["image"].pixels.clone()
    pixels[0, :, 0:4, 0:4] += 5.0  # patch 0 of image 0 is hidden
    changed = _image_batch(mask, True, pixels=pixels)
    assert not torch.allclose(head.targets(changed), head.targets(batch))
    assert torch.equal(model.embed(changed), model.embed(batch))
    loss.backward()
    assert head.grid_decoder.mask_token.grad is not None and model.embedders["image"].patch_embed.proj.weight.grad is not None
    with pytest.raises(ValueError, match="decoder_depth"):
        _image_model(drop_masked=False)(batch)


def test_mask_token_image_and_audio_frames_score_hidden_tokens_only():
    model = _image_model(drop_masked=False)
    mask = _mask()
    batch = _image_batch(mask, False)
    head = model.objectives["d2v"]
    model(batch)
    hidden = torch.randn(batch.num_tokens, D, requires_grad=True)
    out = head(hidden, batch)
    out.loss.backward()
    scored = (hidden.grad.abs().sum(1) > 0).view(2, 17)
    assert not scored[:, 0].any() and torch.equal(scored[:, 1:], mask) and out.count == 14

    torch.manual_seed(0)
    emb = EMBEDDERS.create("audio", feature_dim=6, dim=D, max_len=16, dropout=0.0)
    model = build_model(ModelConfig(encoder=_enc()), [ObjectiveConfig("d2v", args={"modality": "audio", "top_k": 3,
                                                                                   "target_norm": "instance"})],
                        {"audio": emb})
    seq = PackedSeqInfo.from_seqlens([6, 4])
    frames = torch.randn(10, 6)
    fmask = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    audio = PackedBatch(seq, {"audio": FeatureInput(frames, seq.position_ids, fmask)})
    loss, out = model(audio)
    assert torch.isfinite(loss) and out["d2v"].count == 4
    head = model.objectives["d2v"]
    changed = frames.clone()
    changed[1, :3] += 3.0  # a hidden frame: the teacher sees it (targets change), the student sees a mask embedding
    other = PackedBatch(seq, {"audio": FeatureInput(changed, seq.position_ids, fmask)})
    assert torch.equal(model.embed(other), model.embed(audio))
    assert not torch.allclose(head.targets(other), head.targets(audio))


def test_checkpoint_holds_the_teacher_but_the_encoder_does_not(ckpt_d2v):
    from mmm.encoders import load_encoder, read_checkpoint

    state = read_checkpoint(ckpt_d2v).state_dict
    assert int(state["objectives.d2v.teacher.updates"]) == 2 and bool(state["objectives.d2v.teacher.initialized"])
    assert state["objectives.d2v.teacher.encoder.blocks.0.attn.qkv.weight"].dtype == torch.float32
    enc = load_encoder(ckpt_d2v)
    assert not any("teacher" in k for k in enc.state_dict())
    assert torch.equal(enc.encoder.blocks[0].attn.qkv.weight, state["encoder.blocks.0.attn.qkv.weight"])


@pytest.fixture(scope="module")
def ckpt_d2v(tmp_path_factory) -> Path:
    from conftest import TINY_OVERRIDES, REPO

    from mmm.config import load_config
    from mmm.train.pretrain import pretrain

    run = tmp_path_factory.mktemp("d2v_run")
    cfg = load_config(REPO / "configs" / "text_d2v_tiny.yaml", {
        **TINY_OVERRIDES, "trainer.default_root_dir": str(run), "trainer.max_steps": 2, "data.val": None,
        "objectives.0.args": {"top_k": 2}})
    return pretrain(cfg).last_checkpoint


@pytest.mark.parametrize("preset,tiny", [("text_d2v_tiny.yaml", "text"), ("image_d2v_tiny.yaml", "image")])
def test_four_steps_equal_two_then_resume_two(tmp_path: Path, preset, tiny):
    from conftest import REPO, TINY_IMAGE_OVERRIDES, TINY_OVERRIDES

    from mmm.config import load_config
    from mmm.encoders import read_checkpoint
    from mmm.train.pretrain import pretrain

    base = TINY_OVERRIDES if tiny == "text" else TINY_IMAGE_OVERRIDES
    common = {**base, "data.val": None, "objectives.0.args": {"modality": tiny, "top_k": 2, "ema_decay": 0.9,
                                                              "ema_end_decay": 0.99, "ema_anneal_steps": 3,
                                                              "decoder_depth": 0 if tiny == "text" else 1,
                                                              "decoder_dim": 16, "decoder_heads": 2}}

    def run(name, **extra):
        return pretrain(load_config(REPO / "configs" / preset, {**common, "trainer.default_root_dir": str(tmp_path / name),
                                                                **extra}))

    first = run("first", **{"trainer.max_steps": 2})
    if tiny == "text":
        common["model.text.tokenizer_path"] = str(first.run_dir / "tokenizer")  # tokenizer training is not bit-reproducible
    straight = run("straight", **{"trainer.max_steps": 4})
    resumed = run("resumed", **{"trainer.max_steps": 4, "trainer.ckpt_path": str(first.last_checkpoint)})
    a, b = read_checkpoint(straight.last_checkpoint).state_dict, read_checkpoint(resumed.last_checkpoint).state_dict
    start = read_checkpoint(first.last_checkpoint).state_dict
    teacher = [k for k in a if ".teacher." in k and k.endswith("weight")]
    assert teacher and any(not torch.equal(start[k], a[k]) for k in teacher)  # steps 3 and 4 moved the teacher
    assert int(a["objectives.d2v.teacher.updates"]) == 4
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_a_teacher_of_an_encoder_with_modality_experts_copies_and_routes_them():
    torch.manual_seed(0)
    text = EMBEDDERS.create("text", vocab_size=V, dim=D, max_len=16, dropout=0.0, pad_id=0)
    image = ImageEmbedder(D, image_size=8, patch_size=4, cls_token=True, position="sincos")
    model = build_model(ModelConfig(encoder=_enc(experts=True)), [ObjectiveConfig("d2v", args={"top_k": 2})],
                        {"image": image, "text": text})
    head = model.objectives["d2v"]
    assert head.teacher.encoder.experts == 2 and head.expert == 1  # text is the model's second modality
    batch = _text_batch()
    loss, _ = model(batch)
    assert torch.isfinite(loss) and bool(head.teacher.uses_modality_vector)
    # the targets go through the text expert: changing the (teacher's) image expert leaves them alone
    target = head.targets(batch)
    with torch.no_grad():
        for p in head.teacher.encoder.blocks[0].mlp.experts[0].parameters():
            p.add_(1.0)
    assert torch.equal(head.targets(batch), target)
    with torch.no_grad():
        for p in head.teacher.encoder.blocks[0].mlp.experts[1].parameters():
            p.add_(1.0)
    assert not torch.allclose(head.targets(batch), target)


def test_teacher_state_is_kept_on_the_host_and_read_again_after_a_load():
    """A step branches on the teacher's buffers through host copies (no device read); a loaded state
    dict (a resumed run) replaces them, so they are read from the loaded buffers once."""
    from mmm.host_reads import HostReadDetector
    from mmm.objectives.d2v import TeacherState

    model, batch = _text_model(), _text_batch()
    head = model.objectives["d2v"]
    assert head.teacher.state() == TeacherState(False, 0, False)
    with HostReadDetector() as d:
        model(batch)[0].backward()
        model.after_optimizer_step()
        model.after_optimizer_step()
    assert d.found == []
    assert head.teacher.state() == TeacherState(True, 2, bool(head.teacher.uses_modality_vector))
    assert int(head.teacher.updates) == 2 and bool(head.teacher.initialized)
    fresh = _text_model(seed=1)
    fresh.load_state_dict(model.state_dict())  # the parent's load reaches the teacher's hook
    assert fresh.objectives["d2v"].teacher.state() == head.teacher.state()


def test_an_update_right_after_a_load_counts_once():
    """The mirror is read before the buffer moves, so a load then an EMA update agree (1, not 2)."""
    model = _text_model()
    teacher = model.objectives["d2v"].teacher
    head = model.objectives["d2v"]
    head.sync_teacher(model)
    teacher.load_state_dict(teacher.state_dict())  # the mirror is dropped, to be read from the buffers
    named, vector = head._student(model)
    teacher.ema_from([p for _, p in named], vector, 0.5)
    assert int(teacher.updates) == 1 and teacher.state().updates == 1
