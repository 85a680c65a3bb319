"""Retrieval metrics of the vision-language evaluation: recall@K with caption-text relevance and exact chance."""
from math import comb

import pytest
import torch

from mmm.evaluate_vl import recall_at_k


def test_recall_counts_any_item_described_by_the_same_caption():
    # 3 images; images 0 and 1 share the caption "a"; image 2 has "b"
    image_emb = torch.eye(3)
    text_emb = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # "a" nearest image 1, "b" image 2
    score = recall_at_k(image_emb, text_emb, [{"a"}, {"a"}, {"b"}], ["a", "b", "b"], ks=(1, 2))
    # text "a" -> image 1 (has "a"): hit; "b" -> image 2: hit; the second "b" -> image 0 (only "a"): miss
    assert score.t2i["1"] == pytest.approx(2 / 3)
    # image 0 -> nearest text is "b" (index 2): miss; image 1 -> "a": hit; image 2 -> "b": hit
    assert score.i2t["1"] == pytest.approx(2 / 3)
    full = recall_at_k(image_emb, text_emb, [{"a"}, {"a"}, {"b"}], ["a", "b", "b"], ks=(3,))
    assert full.t2i["3"] == 1.0 and full.i2t["3"] == 1.0


def test_chance_is_the_exact_random_ranking_hit_probability():
    n = 10
    image_emb = torch.nn.functional.normalize(torch.randn(n, 4), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.randn(n, 4), dim=-1)
    caps = [{f"c{i % 5}"} for i in range(n)]  # every caption describes exactly 2 images
    texts = [f"c{i % 5}" for i in range(n)]
    score = recall_at_k(image_emb, text_emb, caps, texts, ks=(1, 5))
    assert score.t2i_chance["1"] == pytest.approx(2 / 10)
    assert score.t2i_chance["5"] == pytest.approx(1 - comb(8, 5) / comb(10, 5))
    # a model that ranks with random embeddings averages to chance over many draws
    hits = []
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        a = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
        b = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
        hits.append(recall_at_k(a, b, caps, texts, ks=(1,)).t2i["1"])
    assert sum(hits) / len(hits) == pytest.approx(0.2, abs=0.03)


def test_a_model_that_scores_everything_alike_gets_exactly_chance():
    """argsort broke ties by position: with every embedding equal, R@5 was 1.0 against a chance of 0.78."""
    n = 10
    same = torch.nn.functional.normalize(torch.ones(n, 4), dim=-1)
    caps = [{f"c{i % 5}"} for i in range(n)]
    texts = [f"c{i % 5}" for i in range(n)]
    score = recall_at_k(same, same, caps, texts, ks=(1, 5, 10))
    for k in ("1", "5", "10"):
        assert score.t2i[k] == pytest.approx(score.t2i_chance[k]) and score.i2t[k] == pytest.approx(score.i2t_chance[k])
    assert score.t2i["5"] == pytest.approx(1 - comb(8, 5) / comb(10, 5))


def test_ties_are_broken_at_random_in_expectation():
    # one text query, 4 images: image 0 scores highest (not relevant), images 1-3 tie below it, image 1 relevant
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    text_emb = torch.nn.functional.normalize(torch.tensor([[2.0, 1.0]]), dim=-1)
    score = recall_at_k(image_emb, text_emb, [{"x"}, {"a"}, {"y"}, {"z"}], ["a"], ks=(1, 2, 3, 4))
    # R@1: image 0 takes the only place; R@2: one place among the 3 tied; R@3: two places; R@4: all
    assert score.t2i == pytest.approx({"1": 0.0, "2": 1 / 3, "3": 2 / 3, "4": 1.0})


def test_equal_embeddings_tie_whatever_order_the_product_sums_in():
    g = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(40, 512, generator=g), dim=-1)
    images[25] = images[3]  # the same image twice, far apart in the matrix
    texts_emb = torch.nn.functional.normalize(images[3:4] + 0.01 * torch.randn(1, 512, generator=g), dim=-1)
    caps = [{"d"} if i == 25 else {f"other{i}"} for i in range(40)]
    # the query's best two images are the equal pair; only the second copy is relevant: a coin flip at K=1
    assert recall_at_k(images, texts_emb, caps, ["d"], ks=(1, 2)).t2i == pytest.approx({"1": 0.5, "2": 1.0})


def test_without_ties_recall_is_the_plain_top_k_hit_rate():
    g = torch.Generator().manual_seed(2)
    n = 30
    image_emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    caps = [{f"c{i % 7}"} for i in range(n)]
    texts = [f"c{(i * 3) % 7}" for i in range(n)]
    score = recall_at_k(image_emb, text_emb, caps, texts, ks=(1, 5))
    sim = text_emb.double() @ image_emb.double().T
    rel = torch.tensor([[t in c for c in caps] for t in texts])
    for k in (1, 5):
        top = sim.topk(k, dim=1).indices
        assert score.t2i[str(k)] == pytest.approx(float(rel.gather(1, top).any(1).double().mean()))
        top_t = sim.T.topk(k, dim=1).indices
        assert score.i2t[str(k)] == pytest.approx(float(rel.T.gather(1, top_t).any(1).double().mean()))


def test_non_finite_embeddings_are_refused_not_scored_as_hits():
    """A NaN best-relevant score tied with nothing, so every query counted as a hit: a diverged model scored 1.0."""
    image_emb = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    image_emb[2] = float("nan")
    text_emb = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    caps, texts = [{f"c{i}"} for i in range(4)], [f"c{i}" for i in range(4)]
    with pytest.raises(ValueError, match=r"1 of 4 image embeddings are not finite"):
        recall_at_k(image_emb, text_emb, caps, texts)


def test_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="no images or no captions"):
        recall_at_k(torch.zeros(0, 3), torch.zeros(2, 3), [], ["a", "b"])


def _vl_config(**overrides):
    from conftest import REPO
    from mmm.config import load_config

    return load_config(REPO / "configs" / "vl_uniter_tiny.yaml", {"trainer.default_root_dir": "unused", **overrides})


def test_the_heads_scored_are_chosen_by_kind_not_by_place():
    """``mmm demo --parts vl`` took the itc task's first head as the contrastive one: with ``[itm, itc]`` it
    crashed after training (no embed_pairs), and an itm head trained inside the itc task was never scored."""
    from mmm.evaluate_vl import itc_head_name, itc_task, itm_head_name

    cfg = _vl_config()
    assert itc_head_name(cfg, itc_task(cfg)) == "itc" and itm_head_name(cfg) == "itm"
    hard = _vl_config()
    hard.tasks = [t for t in hard.tasks if t.name != "itm"]
    hard.tasks[-1].objectives = ["itm", "itc"]  # ITM on hard negatives inside the itc task
    assert itc_head_name(hard, itc_task(hard)) == "itc" and itm_head_name(hard) == "itm"
    hard.tasks[-1].objectives = ["itm"]
    assert itc_head_name(hard, itc_task(hard)) is None


def test_the_itm_chance_is_the_majority_share_of_the_scored_pairs():
    from mmm.evaluate_vl import VLScore

    assert VLScore(None, 0.8, 10, itm_matching_share=0.8).itm_chance == pytest.approx(0.8)
    assert VLScore(None, 0.8, 10, itm_matching_share=0.5).itm_chance == pytest.approx(0.5)
    assert VLScore(None, 0.8, 0).itm_chance is None
    # the unseen compositions' pairs have their own matching share (the demo's chance row used the all-val one)
    score = VLScore(None, 0.8, 10, unseen_itm_accuracy=0.7, unseen_itm_pairs=4, itm_matching_share=0.5,
                    unseen_itm_matching_share=0.75)
    assert score.unseen_itm_chance == pytest.approx(0.75) and score.as_dict()["unseen_itm_chance"] == pytest.approx(0.75)
    assert VLScore(None, 0.8, 10).unseen_itm_chance is None


def test_the_unseen_compositions_are_found_by_caption_text(tmp_path):
    """Captions became token-id keys for relevance and the unseen-composition predicate was given those keys: it
    matched none, and the demo's unseen rows vanished without a word."""
    from pathlib import Path

    from mmm.demo.vl import unseen_predicate
    from mmm.evaluate_vl import evaluate_vl, vl_batches
    from mmm.train.pretrain import pretrain
    from mmm.train.tasks import resolve_shards

    cfg = _vl_config(**{"trainer.default_root_dir": str(tmp_path / "run"), "trainer.max_steps": 1,
                        "trainer.enable_progress_bar": False, "trainer.val_check_interval": 1000,
                        "data.batch_size": 8, "data.num_workers": 0, "data.shuffle_buffer": 0,
                        "model.encoder.dim": 32, "model.encoder.depth": 1, "model.encoder.heads": 2,
                        "model.encoder.mlp_hidden": 64, "model.text.vocab_size": 200})
    run = pretrain(cfg)
    feed = run.modalities.feeds["itm"]
    urls = resolve_shards("embedded", "image_text", "val")
    is_unseen = unseen_predicate(Path(urls[0]).parent)
    named = sum(is_unseen(c) for b in vl_batches(feed, urls, "itc", batch_size=64, seed=4321, max_batches=2)
                for c in b.extras["captions"])
    assert named > 0
    score = evaluate_vl(run.module.model, feed, urls, is_unseen=is_unseen, batch_size=64, max_batches=2)
    assert score.unseen_retrieval is not None and score.unseen_retrieval.texts == named
    assert score.unseen_itm_pairs > 0 and score.unseen_itm_accuracy is not None
