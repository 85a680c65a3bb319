"""ITM with hard negatives mined by contrastive similarity: re-pairing a contrastive batch, mining (the model's
step strategy, mmm/steps/hard_negatives.py), training."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from test_image_text_pipeline import F, run, settings, shards, tok  # noqa: E402,F401  (fixtures)

from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig  # noqa: E402
from mmm.modalities.image_text.pairing import joint_pairs  # noqa: E402
from mmm.model import MaskedModel, build_model  # noqa: E402
from mmm.objectives.itm import ImageTextMatching  # noqa: E402
from mmm.steps.hard_negatives import HardNegativeMining  # noqa: E402
from mmm.registry import EMBEDDERS  # noqa: E402


@pytest.mark.parametrize("image_input", ["patches", "regions"])
def test_identity_repairing_of_a_contrastive_batch_is_the_itm_layout(shards, tok, image_input):
    itc = run(shards, tok, settings("itc", image_input))[0]
    itm = run(shards, tok, settings("itm", image_input, itm_negatives=0.0))[0]
    key = "image" if image_input == "patches" else "regions"
    b = itc.targets["itc"].count
    joint = joint_pairs(itc, range(b), range(b), [1] * b, key)
    assert torch.equal(joint.seq.cu_seqlens, itm.seq.cu_seqlens)
    for name in ("ids", "position_ids", "index"):
        assert torch.equal(getattr(joint.inputs["text"], name), getattr(itm.inputs["text"], name)), name
    assert torch.equal(joint.inputs[key].index, itm.inputs[key].index)
    for name in ("cls_positions", "labels", "text_positions", "text_pair", "image_positions", "image_pair"):
        assert torch.equal(getattr(joint.targets["itm"], name), getattr(itm.targets["itm"], name)), name
    # a crossed pairing puts caption 1 before image 0
    crossed = joint_pairs(itc, [1], [0], [0], key)
    n1 = int(itc.seq.cu_seqlens[2] - itc.seq.cu_seqlens[1])
    assert torch.equal(crossed.inputs["text"].ids, itc.inputs["text"].ids[int(itc.seq.cu_seqlens[1]):][:n1])


def _vl_model(image_input: str, vocab: int, negatives: str):
    cfg = ModelConfig(encoder=EncoderConfig(dim=32, depth=1, heads=2, mlp_hidden=64, dropout=0.0, attn_dropout=0.0))
    embedders = {"text": EMBEDDERS.create("text", vocab_size=vocab, dim=32, max_len=64)}
    if image_input == "patches":
        embedders["image"] = EMBEDDERS.create("image", dim=32, image_size=32, patch_size=8)
    else:
        embedders["regions"] = EMBEDDERS.create("regions", dim=32, feature_dim=F)
    objectives = [ObjectiveConfig("itc"), ObjectiveConfig("itm", args={"negatives": negatives})]
    return build_model(cfg, objectives, embedders)


@pytest.mark.parametrize("image_input", ["patches", "regions"])
def test_hard_negatives_are_non_matching_and_follow_similarity(shards, tok, image_input):
    torch.manual_seed(0)
    itc = run(shards, tok, settings("itc", image_input), batch_size=6)[0]
    model = _vl_model(image_input, tok.vocab_size, "hard")
    hidden = model.encode(itc)
    _, mined = model.steps["itm"](model, hidden, itc)
    t, b = mined.targets["itm"], itc.targets["itc"].count
    assert t.count == 3 * b and t.labels.tolist() == [1] * b + [0] * (2 * b)
    caps = itc.extras["captions"]
    pairs = mined.extras["pairs"]
    assert pairs["text"][:b] == pairs["image"][:b] == list(range(b))
    for j, i in zip(pairs["text"][b:], pairs["image"][b:]):  # every negative: a caption whose text is not the image's
        assert caps[j] != caps[i]
    assert sorted(pairs["image"][b:2 * b]) == list(range(b)) and sorted(pairs["text"][2 * b:]) == list(range(b))
    loss, outputs = model(itc)
    assert torch.isfinite(loss) and outputs["itm"].count == 3 * b
    loss.backward()
    assert model.objectives["itm"].classifier.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_similar_pairs_are_drawn_more_often_as_negatives(shards, tok):
    """With a similarity that singles out one caption per image, that caption is the mined negative."""
    itc = run(shards, tok, settings("itc", "regions"), batch_size=6)[0]
    model = _vl_model("regions", tok.vocab_size, "hard")
    head = model.objectives["itc"]
    b = itc.targets["itc"].count
    caps = itc.extras["captions"]
    target = [next(j for j in range((i + 1) % b, b + (i + 1) % b) if caps[j % b] != caps[i]) % b for i in range(b)]

    def fake_embed(hidden, targets):
        img = torch.nn.functional.one_hot(torch.tensor(target), b).float()  # image i most similar to caption target[i]
        return img, torch.eye(b)

    head.embed_pairs = fake_embed
    with torch.no_grad():
        head.logit_scale.fill_(4.6)  # scale 100: the softmax is nearly one-hot
    _, mined = model.steps["itm"](model, model.encode(itc), itc)
    pairs = mined.extras["pairs"]
    assert pairs["text"][b:2 * b] == target  # image i got the caption it is (by far) most similar to


def test_a_caption_that_describes_an_image_is_never_mined_as_its_negative(shards, tok):
    """Image 0's caption set is given the text of caption 1 (two images sharing a caption text): caption 1
    may not be image 0's negative, even when it is by far the most similar one."""
    itc = run(shards, tok, settings("itc", "regions"), batch_size=6)[0]
    assert all(c in d for c, d in zip(itc.extras["caption_keys"], itc.extras["image_captions"]))
    model = _vl_model("regions", tok.vocab_size, "hard")
    head = model.objectives["itc"]
    b = itc.targets["itc"].count
    caps = itc.extras["caption_keys"]
    assert caps[1] != caps[0]
    itc.extras["image_captions"][0] = itc.extras["image_captions"][0] | {caps[1]}
    head.embed_pairs = lambda hidden, targets: (torch.nn.functional.one_hot(torch.ones(b, dtype=torch.long), b).float(),
                                                torch.eye(b))  # every image most similar to caption 1
    with torch.no_grad():
        head.logit_scale.fill_(4.6)
    for seed in range(5):
        torch.manual_seed(seed)
        _, mined = model.steps["itm"](model, model.encode(itc), itc)
        pairs = mined.extras["pairs"]
        negatives = list(zip(pairs["text"][b:], pairs["image"][b:]))
        assert (1, 0) not in negatives
        assert all(caps[t] not in itc.extras["image_captions"][i] for t, i in negatives)


def test_hard_mode_needs_the_contrastive_head(shards, tok):
    cfg = ModelConfig(encoder=EncoderConfig(dim=32, depth=1, heads=2, mlp_hidden=64))
    embedders = {"text": EMBEDDERS.create("text", vocab_size=tok.vocab_size, dim=32, max_len=64),
                 "regions": EMBEDDERS.create("regions", dim=32, feature_dim=F)}
    with pytest.raises(ValueError, match="ranks candidates with the 'itc' head"):  # refused when the model is built
        build_model(cfg, [ObjectiveConfig("itm", args={"negatives": "hard"})], embedders)
    with pytest.raises(ValueError, match="negatives must be 'batch' or 'hard'"):
        build_model(cfg, [ObjectiveConfig("itm", args={"negatives": "soft"})], embedders)


def test_the_itm_head_never_sees_the_model_the_model_runs_the_mining_step(shards, tok):
    """The head's forward takes (hidden, batch) only; the model's step strategy mines and re-encodes, and the
    model's loss and gradients are exactly those of that strategy's batch scored by the head."""
    assert list(inspect.signature(ImageTextMatching.forward).parameters) == ["self", "hidden", "batch"]
    assert not hasattr(ImageTextMatching, "needs_model")
    assert _vl_model("regions", tok.vocab_size, "batch").steps == {}
    itc = run(shards, tok, settings("itc", "regions"), batch_size=6)[0]
    model = _vl_model("regions", tok.vocab_size, "hard")
    step = model.steps["itm"]
    assert isinstance(step, HardNegativeMining) and step.similarity_head == "itc"
    assert step.applies(itc) and not step.applies(run(shards, tok, settings("itm", "regions"))[0])
    with pytest.raises(ValueError, match=r"step strategies for \['mlm'\], which are not heads"):
        MaskedModel(dict(model.embedders), model.encoder, dict(model.objectives), model.weights, steps={"mlm": step})

    torch.manual_seed(3)
    _, outputs = model(itc, heads=["itm"])
    outputs["itm"].loss.backward()
    via_model = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same draws
    hidden, joint = step(model, model.encode(itc), itc)
    b = itc.targets["itc"].count
    assert hidden.shape[0] == joint.num_tokens and joint.targets["itm"].count == 3 * b
    direct = model.objectives["itm"](hidden, joint)
    direct.loss.backward()
    assert torch.equal(direct.loss, outputs["itm"].loss) and direct.count == outputs["itm"].count == 3 * b
    by_hand = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(by_hand) == set(via_model) and any(n.startswith("encoder.") for n in by_hand)
    assert all(torch.equal(by_hand[n], via_model[n]) for n in by_hand)


def test_hard_mode_refuses_two_streams_and_a_similarity_head_that_embeds_no_pairs(tok):
    cfg = ModelConfig(encoder=EncoderConfig(dim=32, depth=1, heads=2, mlp_hidden=64))
    embedders = {"text": EMBEDDERS.create("text", vocab_size=tok.vocab_size, dim=32, max_len=64),
                 "regions": EMBEDDERS.create("regions", dim=32, feature_dim=F)}
    hard = ObjectiveConfig("itm", args={"negatives": "hard", "similarity_head": "mlm"})
    with pytest.raises(ValueError, match="similarity_head 'mlm' is a MaskedLanguageModeling.*name a contrastive head"):
        build_model(cfg, [ObjectiveConfig("mlm"), hard], embedders)
    cfg.image_text.layout = "two_stream"
    with pytest.raises(ValueError, match="does not support model.image_text.layout: two_stream"):
        build_model(cfg, [ObjectiveConfig("itc"), ObjectiveConfig("itm", args={"negatives": "hard"})], embedders)


@pytest.mark.parametrize("image_input", ["patches", "regions"])
def test_a_hard_negative_step_reads_back_once_the_drawn_indices(shards, tok, image_input):
    """The joint batch's layout depends on the drawn captions and images: one read per mining step (planned in
    mmm.train.step_reads.BY_DESIGN), nothing else in the forward or backward of the whole model step."""
    from mmm.host_reads import HostReadDetector
    from mmm.train.step_reads import by_design

    torch.manual_seed(0)
    itc = run(shards, tok, settings("itc", image_input), batch_size=6)[0]
    model = _vl_model(image_input, tok.vocab_size, "hard")
    with HostReadDetector() as d:
        loss, outputs = model(itc)
        loss.backward()
    sites = d.sites()
    assert [(s.what, s.where.rsplit(" in ", 1)[-1]) for s in sites] == [("Tensor.tolist()", "mine")]
    assert by_design(sites[0]) is not None
    assert outputs["itm"].count == 3 * itc.targets["itc"].count


def test_mining_on_non_finite_similarities_draws_allowed_negatives_and_leaves_the_loss_to_the_policy(shards, tok):
    """A diverged step (NaN states) still mines: uniformly among the non-matching captions and images; the
    loss is then not finite and trainer.nonfinite_loss decides, as for any other head."""
    itc = run(shards, tok, settings("itc", "regions"), batch_size=6)[0]
    model = _vl_model("regions", tok.vocab_size, "hard")
    hidden = torch.full((itc.num_tokens, 32), float("nan"))
    mined = model.steps["itm"].mine(model.objectives["itc"], hidden, itc)
    b, caps, pairs = itc.targets["itc"].count, itc.extras["captions"], mined.extras["pairs"]
    assert len(pairs["text"]) == 3 * b
    for j, i in zip(pairs["text"][b:], pairs["image"][b:]):
        assert caps[j] != caps[i]


def test_validation_mines_the_same_negatives_every_pass_without_moving_the_training_draws(shards, tok):
    """Validation mining drew from the global generator: other negatives on every pass of the same batch (the
    ITM metric moved with frozen weights), and each validation shifted the training run's later draws."""
    torch.manual_seed(0)
    itc = run(shards, tok, settings("itc", "regions"), batch_size=8)[0]
    model = _vl_model("regions", tok.vocab_size, "hard").eval()
    with torch.no_grad():
        hidden = model.encode(itc)
    step = model.steps["itm"]
    picks = []
    for seed in range(3):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        _, mined = step(model, hidden, itc)
        assert torch.equal(torch.get_rng_state(), before)  # validation leaves the training draws alone
        picks.append(mined.extras["pairs"])
    assert picks[0] == picks[1] == picks[2]
    model.train()  # training still draws from the run's generator: other seeds, other negatives
    drawn = set()
    for seed in range(5):
        torch.manual_seed(seed)
        drawn.add(str(step.mine(model.objectives["itc"], hidden, itc).extras["pairs"]))
    assert len(drawn) > 1
