"""Image-text stages: batch layout per mode (mlm / mrm / itm / itc), patches and regions, determinism, bad samples."""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import mmm.masking  # noqa: F401  (registers maskers)
from datasets_def import image as image_def
from datasets_def import image_text as it
from mmm.batch import ImageInput, RegionInput, TokenInput
from mmm.modalities.image.pipeline import ImageSettings
from mmm.modalities.image_text.pipeline import ImageTextSettings, choose_itm_negatives, image_text_stages
from mmm.data.stream import SampleError, SampleErrorHandler, list_shards, make_pipeline
from mmm.registry import MASKERS, TOKENIZERS

F, N_IMAGES, CAPS = 16, 6, 2
IMAGE = ImageSettings(image_size=32, patch_size=8, cls_token=True, drop_masked=False)


def _build(root: Path) -> Path:
    (root / "img").mkdir(parents=True)
    (root / "regions").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        shape, color = image_def.SHAPES[i], list(image_def.COLORS)[i]
        img, _ = image_def.render_scene(shape, color, "large", "center", np.random.default_rng(i))
        img.save(root / "img" / f"s{i}.png")
        rows += [(f"s{i}.png", f"a {color} {shape}"), (f"s{i}.png", f"there is a big {color} {shape} here")]
        r = 2 + i % 3
        np.savez(root / "regions" / f"s{i}.npz", features=rng.standard_normal((r, F)).astype(np.float32),
                 boxes=rng.uniform(0, 0.5, (r, 4)) @ np.array([[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]])
                 * 32, soft=rng.dirichlet(np.ones(7), size=r).astype(np.float32))
    with (root / "captions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        w.writerows(rows)
    it.build_shards(root / "img", root / "shards", captions=root / "captions.csv", regions=root / "regions",
                    samples_per_shard=4)
    return root / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("image_text"))


@pytest.fixture(scope="module")
def tok(shards):
    from datasets_def.text import iter_texts

    return TOKENIZERS.create("wordpiece", texts=list(iter_texts(shards)), vocab_size=120, lowercase=True)


def settings(mode: str, image_input: str = "patches", **kw) -> ImageTextSettings:
    return ImageTextSettings(mode, image_input, image=IMAGE, feature_dim=F, **kw)


def run(shards, tok, s: ImageTextSettings, masker=None, seed: int = 0, batch_size: int = 4, handler=None, urls=None):
    stages = image_text_stages(s, tok, masker, batch_size=batch_size, seed=seed,
                               handler=handler or SampleErrorHandler())
    return list(make_pipeline(urls or list_shards(shards, split="train"), stages=stages, shuffle_shards=False,
                              shuffle_buffer=0, handler=handler))


def token_masker(tok):
    return MASKERS.create("bert_random", vocab=tok.vocab(), ratio=0.3)


def _covered(batch) -> torch.Tensor:
    idx = torch.cat([inp.index for inp in batch.inputs.values()])
    return torch.sort(idx).values


def assert_layout(batch):
    """Every stream position filled exactly once."""
    assert torch.equal(_covered(batch), torch.arange(batch.num_tokens))


def test_one_pair_per_caption_none_dropped(shards, tok):
    batches = run(shards, tok, settings("itm", itm_negatives=0.0))
    keys = [k for b in batches for k in b.extras["keys"]]
    assert len(keys) == N_IMAGES * CAPS and len(set(keys)) == N_IMAGES
    caps = [c for b in batches for c in b.extras["captions"]]
    assert len(set(caps)) == N_IMAGES * CAPS


@pytest.mark.parametrize("image_input", ["patches", "regions"])
def test_mlm_masks_text_only_and_targets_point_at_masked_text(shards, tok, image_input):
    for batch in run(shards, tok, settings("mlm", image_input), token_masker(tok)):
        assert_layout(batch)
        text = batch.inputs["text"]
        vision = batch.inputs["image" if image_input == "patches" else "regions"]
        assert vision.mask is None  # the other modality fully visible
        t = batch.targets["text"]
        assert t.count > 0 and set(t.positions.tolist()) <= set(text.index.tolist())
        starts = batch.seq.cu_seqlens[:-1].long()
        assert not set(t.positions.tolist()) & set(starts.tolist())  # never the [CLS]
        # text first: each sequence starts with [CLS], its image tokens follow the text
        where = {int(p): i for i, p in enumerate(text.index)}
        assert all(int(text.ids[where[int(s)]]) == tok.cls_id for s in starts)
        changed = text.ids[[where[int(p)] for p in t.positions]] != t.labels
        assert changed.float().mean() > 0.5  # 80/10/10: most hidden tokens are corrupted
        assert set(batch.targets) == {"text"}


def test_mrm_patches_mask_token_mode_and_pixel_index(shards, tok):
    masker = MASKERS.create("simmim_random", ratio=0.5, mask_patch=1)
    for batch in run(shards, tok, settings("mrm"), masker):
        assert_layout(batch)
        img: ImageInput = batch.inputs["image"]
        assert not img.drop_masked and img.mask.shape == (batch.num_sequences, 16)
        t = batch.targets["mrm"]
        assert t.features is None and t.soft_labels is None
        assert t.count == int(img.mask.sum())
        starts = batch.seq.cu_seqlens[:-1].long()
        text_len = torch.bincount(torch.bucketize(batch.inputs["text"].index, batch.seq.cu_seqlens[1:].long(),
                                                  right=True), minlength=batch.num_sequences)
        i, p = t.pixel_index[:, 0], t.pixel_index[:, 1]
        assert bool(img.mask[i, p].all())
        assert torch.equal(t.positions, starts[i] + text_len[i] + 1 + p)  # [CLS] of the image, then patches
        assert set(t.positions.tolist()) <= set(img.index.tolist())
        assert "text" not in batch.targets


def test_mrm_regions_targets_are_original_features_and_soft_labels(shards, tok):
    masker = MASKERS.create("region_random", ratio=0.3)
    for batch in run(shards, tok, settings("mrm", "regions"), masker):
        assert_layout(batch)
        reg: RegionInput = batch.inputs["regions"]
        t = batch.targets["mrm"]
        assert torch.equal(t.positions, reg.index[reg.mask])
        assert torch.equal(t.features, reg.features[reg.mask])
        assert t.soft_labels.shape == (t.count, 7) and torch.allclose(t.soft_labels.sum(1), torch.ones(t.count), atol=1e-5)
        assert t.pixel_index is None and reg.boxes.shape == (reg.features.shape[0], 7)


@pytest.mark.parametrize("image_input", ["patches", "regions"])
def test_itm_negatives_have_other_captions_and_label_zero(shards, tok, image_input):
    own = [c for b in run(shards, tok, settings("itm", image_input, itm_negatives=0.0)) for c in b.extras["captions"]]
    n = 0
    for batch in run(shards, tok, settings("itm", image_input, itm_negatives=0.5)):
        assert_layout(batch)
        t = batch.targets["itm"]
        b = batch.num_sequences
        mine = own[n:n + b]
        n += b
        assert int((t.labels == 0).sum()) == round(0.5 * b)
        for label, cap, orig in zip(t.labels.tolist(), batch.extras["captions"], mine):
            assert (cap != orig) == (label == 0)
        assert torch.equal(t.cls_positions, batch.seq.cu_seqlens[:-1].long())
        text = batch.inputs["text"]
        where = {int(p): i for i, p in enumerate(text.index)}
        special = {tok.cls_id, tok.sep_id}
        assert all(int(text.ids[where[int(p)]]) not in special for p in t.text_positions)
        assert len(t.text_positions) == text.ids.numel() - 2 * b
        vision = batch.inputs["image" if image_input == "patches" else "regions"]
        assert set(t.image_positions.tolist()) <= set(vision.index.tolist())
        prefix = 1 if image_input == "patches" else 0
        assert len(t.image_positions) == vision.index.numel() - prefix * b
        assert torch.equal(torch.bincount(t.image_pair, minlength=b) > 0, torch.ones(b, dtype=torch.bool))


@pytest.mark.parametrize("image_input", ["patches", "regions"])
def test_itc_has_2b_single_modality_sequences(shards, tok, image_input):
    for batch in run(shards, tok, settings("itc", image_input)):
        assert_layout(batch)
        t = batch.targets["itc"]
        b = t.count
        assert batch.num_sequences == 2 * b
        starts = batch.seq.cu_seqlens[:-1].long()
        assert torch.equal(t.text_positions, starts[:b])
        text: TokenInput = batch.inputs["text"]
        assert int(text.index.max()) < int(starts[b])  # captions first, each alone
        vision = batch.inputs["image" if image_input == "patches" else "regions"]
        assert int(vision.index.min()) == int(starts[b])
        owner_start = starts[b:][t.image_owner]
        assert bool((t.image_positions >= owner_start).all())
        assert torch.equal(torch.unique(t.image_owner), torch.arange(b))


def test_same_seed_same_batches_other_seed_differs(shards, tok):
    def fingerprint(seed):
        out = []
        for mode, masker in (("mlm", token_masker(tok)), ("itm", None)):
            for batch in run(shards, tok, settings(mode, itm_negatives=0.5), masker, seed=seed):
                out.append(batch.inputs["text"].ids.tolist())
                out.append(batch.targets["itm"].labels.tolist() if mode == "itm" else batch.targets["text"].positions.tolist())
        return out

    assert fingerprint(3) == fingerprint(3)
    assert fingerprint(3) != fingerprint(4)


def test_long_captions_are_cut_and_counted(shards, tok):
    batches = run(shards, tok, settings("itm", max_text_len=4, itm_negatives=0.0))
    assert sum(b.extras["text_cut"] for b in batches) > 0
    for batch in batches:
        assert batch.inputs["text"].ids.numel() <= 4 * batch.num_sequences


def test_itm_negative_missing_when_every_caption_is_the_same():
    own = lambda caps: [{c} for c in caps]  # noqa: E731  (each image described by its one caption)
    source, missing = choose_itm_negatives(["a", "a", "a"], own("aaa"), 1.0, np.random.default_rng(0))
    assert missing == 3 and source.tolist() == [0, 1, 2]
    source, missing = choose_itm_negatives(["a", "b", "a", "c"], own("abac"), 0.5,
                                           np.random.default_rng(0))
    assert missing == 0 and sum(source != np.arange(4)) == 2


def test_an_itm_negative_is_never_a_caption_that_describes_the_image():
    """Image 0 is 'a red circle' and 'a red circle on the left'; image 1's caption is also 'a red circle on
    the left' (two images may share a caption text). It is no negative for image 0: only 'a blue square' is."""
    captions = ["a red circle", "a red circle on the left", "a blue square"]
    described = [{"a red circle", "a red circle on the left"}, {"a red circle on the left"}, {"a blue square"}]
    for seed in range(20):
        source, missing = choose_itm_negatives(captions, described, 1.0, np.random.default_rng(seed))
        assert source[0] == 2 and source[1] in (0, 2) and missing == 0
        assert all(captions[j] not in described[i] for i, j in enumerate(source))


def _rewrite(src: str, dst: Path, field: str, data: bytes) -> None:
    """Copy a shard, replacing ``field`` of its first sample."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        first = None
        for m in tin.getmembers():
            payload = tin.extractfile(m).read()
            key, _, ext = m.name.partition(".")
            first = first or key
            if key == first and ext == field:
                payload = data
            info = tarfile.TarInfo(m.name)
            info.size = len(payload)
            tout.addfile(info, io.BytesIO(payload))


def test_bad_region_field_names_shard_key_and_field_or_is_skipped(shards, tok, tmp_path):
    src = list_shards(shards, split="train")[0]
    bad = tmp_path / "train-000000.tar"
    nan = np.full((2, F), np.nan, np.float32)
    _rewrite(src, bad, "features.npy", it.npy_bytes(nan))
    s = settings("itc", "regions")
    with pytest.raises(SampleError, match="features.npy"):
        run(shards, tok, s, urls=[str(bad)])
    handler = SampleErrorHandler(skip_bad=True)
    batches = run(shards, tok, s, urls=[str(bad)], handler=handler)
    assert handler.total == 1 and sum(b.targets["itc"].count for b in batches) == (4 - 1) * CAPS


def test_region_feature_size_must_match_the_config(shards, tok):
    s = ImageTextSettings("itc", "regions", feature_dim=F + 1)
    with pytest.raises(SampleError, match=f"expected {F + 1}"):
        run(shards, tok, s)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="mode"):
        ImageTextSettings("mim", "patches", image=IMAGE)
    with pytest.raises(ValueError, match="image_input"):
        ImageTextSettings("mlm", "pixels", image=IMAGE)
    with pytest.raises(ValueError, match="needs a masker"):
        image_text_stages(settings("mlm"), None, None, batch_size=2, seed=0, handler=SampleErrorHandler())


def test_masks_and_negatives_keyed_by_epoch_for_exact_resume(shards, tok):
    from mmm.data.epoch import EpochCounter

    def epoch_batches(start):
        epochs = EpochCounter(start)
        s = settings("mlm")
        stages = image_text_stages(s, tok, token_masker(tok), batch_size=4, seed=0, handler=SampleErrorHandler(),
                                   epochs=epochs)
        pipe = make_pipeline(list_shards(shards, split="train"), stages=stages, shuffle_shards=False,
                             shuffle_buffer=0, epochs=epochs)
        return [b.targets["text"].positions.tolist() for b in pipe]

    assert epoch_batches(2) == epoch_batches(2)  # a fresh process starting at epoch 2 sees the same masks
    assert epoch_batches(2) != epoch_batches(3)


def test_itm_and_itc_batches_never_hold_one_image_twice_and_lose_no_pair():
    from collections import namedtuple

    from mmm.modalities.image_text.pipeline import batches_of_distinct_images

    P = namedtuple("P", "key n")
    rng = np.random.default_rng(0)
    pairs = [P(f"img{int(k)}", i) for i, k in enumerate(rng.integers(0, 9, 200))]  # many repeats
    batches = list(batches_of_distinct_images(iter(pairs), 4))
    assert sorted(p.n for b in batches for p in b) == list(range(200))  # none dropped, none repeated
    for b in batches:
        assert 1 <= len(b) <= 4 and len({p.key for p in b}) == len(b)
    distinct = [P(f"k{i}", i) for i in range(10)]  # without repeats it is plain batching
    assert [[p.n for p in b] for b in batches_of_distinct_images(iter(distinct), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_itc_batches_of_the_pipeline_have_distinct_images(shards, tok):
    for batch in run(shards, tok, settings("itc"), batch_size=4):
        keys = batch.extras["keys"]
        assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("mode", ["mlm", "mrm", "itm"])
def test_two_stream_layout_pairs_separate_caption_and_image_sequences(shards, tok, mode):
    masker = {"mlm": token_masker(tok), "mrm": MASKERS.create("region_random", ratio=0.5), "itm": None}[mode]
    single = run(shards, tok, settings(mode, "regions"), masker)[0]
    two = run(shards, tok, settings(mode, "regions", layout="two_stream"), masker)[0]
    b = two.extras["labels"].numel()
    assert two.num_sequences == 2 * b and single.num_sequences == b and single.partners is None
    assert two.partners.tolist() == list(range(b, 2 * b)) + list(range(b))
    assert_layout(two)
    cu = two.seq.cu_seqlens.tolist()
    assert two.inputs["text"].index.tolist() == list(range(cu[b]))  # captions first, then images
    assert two.inputs["regions"].index.tolist() == list(range(cu[b], cu[2 * b]))
    # the same tokens and targets, only laid out differently
    assert torch.equal(two.inputs["text"].ids, single.inputs["text"].ids)
    if mode == "mlm":
        t2, t1 = two.targets["text"], single.targets["text"]
        assert torch.equal(t2.labels, t1.labels)
        assert torch.equal(two.inputs["text"].ids[t2.positions], single.inputs["text"].ids[
            (single.inputs["text"].index[:, None] == t1.positions[None]).nonzero()[:, 0]])
    if mode == "itm":
        assert two.targets["itm"].cls_positions.tolist() == cu[:b]
    with pytest.raises(ValueError, match="layout must be single or two_stream"):
        settings(mode, "regions", layout="lxmert")


def test_itm_negatives_that_cannot_be_drawn_are_logged_and_warned_once(caplog):
    """A batch whose captions all describe each other's images (or a batch of one) gave the itm head positives only,
    and only ``extras["itm_no_negative"]`` knew; it is logged per step and warned about the first time."""
    import types

    from mmm.train.module import MaskedModelingModule

    fake = types.SimpleNamespace(_pending_logs={}, _itm_shortfall_warned=False, global_step=7)
    batch = types.SimpleNamespace(task="itm", extras={"itm_no_negative": 2, "keys": ["a", "b", "c", "d"]})
    MaskedModelingModule._note_itm_shortfall(fake, batch)
    MaskedModelingModule._note_itm_shortfall(fake, batch)
    assert float(fake._pending_logs["train/itm/itm_no_negative"][0]) == 2.0
    warned = [r for r in caplog.records if "drawn as negatives stayed positive" in r.getMessage()]
    assert len(warned) == 1 and "ITM (task 'itm'): 2 of 4 pair(s)" in warned[0].getMessage()


def test_captions_differing_only_in_case_are_one_caption_to_negatives():
    """"A Photo" and "a photo" give the same token ids under a lowercasing tokenizer, yet one pair took the other as
    its ITM negative: the same model input labelled match and no-match. Captions now compare by the ids read."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from mmm.modalities.image_text.pipeline import caption_key, encode_caption
    from mmm.modalities.text.tokenizer import TextTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["a", "photo", "dog", "of", "the", "red", "blue", "car"]
    hf = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = TextTokenizer(hf, dict(zip(("pad", "unk", "cls", "sep", "mask"), specials)), True, "wordpiece")

    def key(text: str, max_len: int = 16) -> str:
        return caption_key(encode_caption(tok, text, max_len)[0])

    assert key("A  Photo\n") == key("a photo") != key("a dog")
    # what the model reads after the cut, and words it reads as [UNK], are one caption too (they were not)
    assert key("a photo of the red car", 6) == key("a photo of the blue car", 6)
    assert key("a photo of a zebra") == key("a photo of a giraffe")
    for texts in (("a photo", "A Photo", "a dog"), ("a photo of the red car", "a photo of the blue car", "a dog"),
                  ("a photo of a zebra", "a photo of a giraffe", "a dog")):
        keys = [key(t, 6) for t in texts]
        own = [frozenset({k}) for k in keys]
        for seed in range(20):
            source, _ = choose_itm_negatives(keys, own, 1.0, np.random.default_rng(seed))
            assert source[0] in (0, 2) and source[1] in (1, 2)  # never each other


def test_a_caption_that_gives_no_token_is_a_bad_sample_not_an_empty_caption(shards, tok, tmp_path):
    """Only combining accents is not blank, but a lowercasing tokenizer strips all of it: the pair trained as
    [CLS] [SEP] against its image, uncounted (the text pipeline counts such a text as bad)."""
    import json

    src = list_shards(shards, split="train")[0]
    with tarfile.open(src) as tin:
        first_json = next(m for m in tin.getmembers() if m.name.endswith(".json"))
        meta = json.loads(tin.extractfile(first_json).read())
    meta["captions"] = [meta["captions"][0], "\u0301\u0300"]
    bad = tmp_path / "train-000000.tar"
    _rewrite(src, bad, "json", json.dumps(meta).encode())
    s = settings("itc")
    with pytest.raises(SampleError, match=r"train-000000.tar:.*caption 1 \(2 character\(s\).*gave no token"):
        run(shards, tok, s, urls=[str(bad)])
    handler = SampleErrorHandler(skip_bad=True)
    batches = run(shards, tok, s, urls=[str(bad)], handler=handler)
    assert handler.total == 1 and sum(b.targets["itc"].count for b in batches) == (4 - 1) * CAPS
