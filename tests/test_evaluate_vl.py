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
