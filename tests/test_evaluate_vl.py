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
