"""Held-out vision-language evaluation: zero-shot image↔text retrieval (R@1/5/10) and ITM accuracy.

Retrieval follows CLIP / UNITER's zero-shot protocol with the single-stream encoder: every image
and every caption of the held-out split is encoded *alone* (the ``itc`` stream of the
``image_text`` modality), projected by the contrastive head and ranked by cosine similarity.
Captions of the embedded set come from a small grammar, so several images share a caption and a
caption describes every image with the same attributes: a retrieved item counts as correct when it
is *described by the same caption text* (for text→image: the image has that caption; for
image→text: the caption is one of the image's captions). Chance levels are computed exactly for
the same relevance sets (a random ranking's hit probability per query, averaged). ITM accuracy is
the ``itm`` head's matched/mismatched accuracy on pairs with seeded in-batch negatives (chance
0.5 at the default 50% negatives). Both are also reported on the subset of held-out (unseen)
attribute compositions when ``unseen`` captions are given.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from mmm.data.stream import SampleErrorHandler, make_pipeline
from mmm.eval_mode import eval_mode
from mmm.model import MaskedModel

KS = (1, 5, 10)


@dataclass
class RetrievalScore:
    """Recall@K both ways (keyed by ``str(K)``), with the chance level of each, over ``images`` images and
    ``texts`` captions."""

    images: int
    texts: int
    t2i: Dict[str, float]
    i2t: Dict[str, float]
    t2i_chance: Dict[str, float]
    i2t_chance: Dict[str, float]


@dataclass
class VLScore:
    """Everything :func:`evaluate_vl` measures."""

    retrieval: RetrievalScore
    itm_accuracy: float
    itm_pairs: int
    unseen_retrieval: Optional[RetrievalScore] = None
    unseen_itm_accuracy: Optional[float] = None
    unseen_itm_pairs: int = 0
    itm_matching_share: Optional[float] = None  # share of scored pairs that match (model.image_text.itm_negatives)
    unseen_itm_matching_share: Optional[float] = None  # the same on the unseen-composition pairs

    @property
    def itm_chance(self) -> Optional[float]:
        """ITM accuracy of always answering the majority label (0.5 with half the captions swapped)."""
        p = self.itm_matching_share
        return None if p is None else max(p, 1.0 - p)

    @property
    def unseen_itm_chance(self) -> Optional[float]:
        """:attr:`itm_chance` of the unseen-composition pairs alone (their own matching share)."""
        p = self.unseen_itm_matching_share
        return None if p is None else max(p, 1.0 - p)

    def as_dict(self) -> Dict[str, object]:
        """Plain data (nested dicts), for ``metrics.json``, with :attr:`itm_chance`."""
        return {**asdict(self), "itm_chance": self.itm_chance, "unseen_itm_chance": self.unseen_itm_chance}


def itc_task(cfg):
    """The config's first ``image_text`` task of mode ``itc`` (its head gives the retrieval projections), or None."""
    return next((t for t in cfg.tasks if t.options.get("mode") == "itc"), None)


def _objective_of(cfg, head: str):
    from mmm.model import head_name

    return next((o for o in cfg.objectives if head_name(o) == head), None)


def itc_head_name(cfg, task) -> Optional[str]:
    """The contrastive head of ``task`` (the first one with ``embed_pairs``: it gives the retrieval projections),
    whatever its place in the task's ``objectives``; None when the task has none."""
    from mmm.registry import OBJECTIVES

    for head in task.objectives:
        o = _objective_of(cfg, head)
        if o is not None and o.name in OBJECTIVES and hasattr(OBJECTIVES.get(o.name), "embed_pairs"):
            return head
    return None


def itm_head_name(cfg) -> Optional[str]:
    """The ITM head that scores ITM accuracy: the one of an ``itm``-mode task, else an ``itm`` head trained by
    another task (e.g. on hard negatives inside an ``itc`` task); None when the run has none."""
    def itm_heads(tasks):
        for t in tasks:
            for head in t.objectives:
                o = _objective_of(cfg, head)
                if o is not None and o.name == "itm":
                    yield head

    first_choice = [t for t in cfg.tasks if t.options.get("mode") == "itm"]
    return next(itm_heads(first_choice), None) or next(itm_heads(cfg.tasks), None)


def _chance(relevant: Sequence[int], pool: int, k: int) -> float:
    """Mean probability that a random ranking of ``pool`` items puts one of ``m`` relevant ones in the top k."""
    k = min(k, pool)
    return float(np.mean([1.0 - comb(pool - m, k) / comb(pool, k) for m in relevant]))


def _hit_rates(sim: torch.Tensor, rel: torch.Tensor, k: int) -> torch.Tensor:
    """Per query (row), the probability that a relevant item is in the top ``k`` when ties in ``sim`` are broken
    uniformly at random.

    Only the best-scored relevant items can decide a hit: with ``above`` items scored higher and a tie group of
    ``tied`` items (``tied_rel`` of them relevant) at that score, ``k - above`` places go to a uniform random
    subset of the group. A ranking by ``argsort`` would instead break ties by position: a collapsed model (every
    score equal) then scored R@5 = 1.0 where a random ranking scores 0.78.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype)
    best = torch.where(rel, sim, neg_inf).max(dim=1, keepdim=True).values  # (Q, 1) best relevant score
    above = (sim > best).sum(1).tolist()
    at_best = sim == best
    tied, tied_rel = at_best.sum(1).tolist(), (at_best & rel).sum(1).tolist()
    has_rel = rel.any(1).tolist()
    rates = []
    for ok, a, t, r in zip(has_rel, above, tied, tied_rel):
        places = k - a
        if not ok or places <= 0:
            rates.append(0.0)
        elif places >= t:
            rates.append(1.0)
        else:
            rates.append(1.0 - comb(t - r, places) / comb(t, places))
    return torch.tensor(rates, dtype=torch.float64)


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, image_captions: List[set], texts: List[str],
                ks: Iterable[int] = KS) -> RetrievalScore:
    """Recall@K of text→image and image→text retrieval with caption-text relevance.

    Tied scores are broken uniformly at random, in expectation (:func:`_hit_rates`), so a model that scores
    everything alike gets exactly the chance level. Scores are products computed in fp64 and compared at fp32
    resolution, so equal embeddings tie whatever order the matrix product sums in.

    Args:
        image_emb: (I, E) L2-normalised image embeddings (one per distinct image).
        text_emb: (T, E) L2-normalised caption embeddings.
        image_captions: per image, the set of caption strings that describe it.
        texts: per caption embedding, its string.
        ks: the K values.
    """
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("recall_at_k: no images or no captions to rank")
    bad = [f"{int((~torch.isfinite(e)).any(1).sum())} of {e.shape[0]} {what} embeddings"
           for e, what in ((image_emb, "image"), (text_emb, "caption")) if not torch.isfinite(e).all()]
    if bad:  # NaN compares unequal to everything: every query would count as a hit
        raise ValueError(f"recall_at_k: {' and '.join(bad)} are not finite (NaN or inf: a diverged model?); "
                         f"retrieval cannot rank them")
    sim = (text_emb.double().cpu() @ image_emb.double().cpu().T).float()  # (T, I)
    rel = torch.tensor([[t in caps for caps in image_captions] for t in texts], dtype=torch.bool)  # (T, I)
    ks = [k for k in ks]
    t2i = {str(k): float(_hit_rates(sim, rel, k).mean()) for k in ks}
    i2t = {str(k): float(_hit_rates(sim.T, rel.T, k).mean()) for k in ks}
    n_img, n_txt = sim.shape[1], sim.shape[0]
    t_rel, i_rel = rel.sum(1).tolist(), rel.sum(0).tolist()
    return RetrievalScore(n_img, n_txt, t2i, i2t, {str(k): _chance(t_rel, n_img, k) for k in ks},
                          {str(k): _chance(i_rel, n_txt, k) for k in ks})


def vl_batches(feed, urls: List[str], mode: str, *, batch_size: int, seed: int, masker=None,
               max_batches: Optional[int] = None):
    """Held-out ``image_text`` batches of one mode (fixed seeds, no shuffling, no augmentation).

    Args:
        feed: the run's ``image_text`` modality (assets prepared or loaded, bound to its parts).
        urls: held-out shards.
        mode: ``itc`` or ``itm`` (or ``mlm`` / ``mrm`` with ``masker``).
        batch_size: pairs per batch.
        seed: seed of the ITM negatives / masks.
        masker: the masker for mlm / mrm modes.
        max_batches: stop after this many batches.
    """
    stages = feed.stages(masker, batch_size=batch_size, seed=seed, handler=SampleErrorHandler(), fixed_masking=True,
                         epochs=None, train=False, options={"mode": mode})
    pipeline = make_pipeline(urls, stages=stages, shuffle_shards=False, shuffle_buffer=0)
    for i, batch in enumerate(pipeline):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def evaluate_vl(model: MaskedModel, feed, urls: List[str], *, itc_head: str = "itc", itm_head: Optional[str] = "itm",
                batch_size: int = 64, seed: int = 4321, is_unseen: Optional[Callable[[str], bool]] = None,
                max_batches: Optional[int] = None) -> VLScore:
    """Zero-shot retrieval and ITM accuracy of ``model`` on the held-out shards ``urls``.

    Args:
        model: a model with an ``itc`` head (and an ``itm`` head unless ``itm_head`` is None).
        feed: the run's ``image_text`` modality.
        urls: held-out shards.
        itc_head: name of the contrastive head (gives the projections).
        itm_head: name of the ITM head, or None to skip ITM.
        batch_size: pairs per batch.
        seed: seed of the ITM negatives.
        is_unseen: caption text → True when it names a held-out attribute composition (scores that subset too).
        max_batches: cap per mode (quick runs).

    The model is scored in eval mode and handed back in the mode it came in.
    """
    with eval_mode(model), torch.no_grad():
        return _evaluate_vl(model, feed, urls, itc_head=itc_head, itm_head=itm_head, batch_size=batch_size, seed=seed,
                            is_unseen=is_unseen, max_batches=max_batches)


def _evaluate_vl(model: MaskedModel, feed, urls: List[str], *, itc_head: str, itm_head: Optional[str],
                 batch_size: int, seed: int, is_unseen: Optional[Callable[[str], bool]],
                 max_batches: Optional[int]) -> VLScore:
    device = next(model.parameters()).device
    if itc_head not in model.objectives:
        raise ValueError(f"evaluate_vl: the model has no {itc_head!r} head (heads: {list(model.objectives)})")
    head = model.objectives[itc_head]
    images: Dict[str, torch.Tensor] = {}
    captions_of: Dict[str, set] = {}  # caption keys (relevance)
    raw_of: Dict[str, set] = {}  # the captions' text (what is_unseen reads)
    text_embs: List[torch.Tensor] = []
    texts: List[str] = []
    raw_texts: List[str] = []
    for batch in vl_batches(feed, urls, "itc", batch_size=batch_size, seed=seed, max_batches=max_batches):
        batch = batch.to(device)
        hidden = model.encode(batch)
        img, txt = head.embed_pairs(hidden, batch.targets["itc"])  # (B, E), (B, E)
        said = batch.extras.get("caption_keys") or batch.extras["captions"]  # the ids the model reads: "A Photo" = "a photo"
        raw = batch.extras["captions"]
        for i, (key, cap, described) in enumerate(zip(batch.extras["keys"], said, batch.extras["image_captions"])):
            images.setdefault(key, img[i].cpu())
            captions_of.setdefault(key, set()).update({cap, *described})  # every caption of the image
            raw_of.setdefault(key, set()).add(raw[i])  # every caption is a pair of an itc batch
        text_embs.append(txt.cpu())
        texts.extend(said)
        raw_texts.extend(raw)
    if not texts:
        raise ValueError(f"evaluate_vl: the held-out shards {urls[:3]} gave no image-text pairs")
    keys = list(images)
    image_emb = torch.stack([images[k] for k in keys])
    image_caps = [captions_of[k] for k in keys]
    text_emb = torch.cat(text_embs)
    retrieval = recall_at_k(image_emb, text_emb, image_caps, texts)
    unseen_retrieval = None
    if is_unseen is not None:
        t_sel = [i for i, t in enumerate(raw_texts) if is_unseen(t)]
        i_sel = [i for i, k in enumerate(keys) if any(is_unseen(c) for c in raw_of[k])]
        if t_sel and i_sel:
            unseen_retrieval = recall_at_k(image_emb[i_sel], text_emb[t_sel], [image_caps[i] for i in i_sel],
                                           [texts[i] for i in t_sel])
    itm_acc, itm_n, un_acc, un_n, matching, un_matching = float("nan"), 0, None, 0, None, None
    if itm_head is not None:
        if itm_head not in model.objectives:
            raise ValueError(f"evaluate_vl: the model has no {itm_head!r} head (heads: {list(model.objectives)})")
        correct = un_correct = positives = un_positives = 0.0
        for batch in vl_batches(feed, urls, "itm", batch_size=batch_size, seed=seed, max_batches=max_batches):
            batch = batch.to(device)
            hidden = model.encode(batch)
            t = batch.targets["itm"]
            pred = model.objectives[itm_head].predict(hidden, t).cpu()  # (B,)
            ok = (pred == t.labels.cpu()).float()
            correct += float(ok.sum())
            positives += float((t.labels.cpu() == 1).sum())
            itm_n += len(ok)
            if is_unseen is not None:
                keys_b = batch.extras["keys"]
                sel = [i for i, k in enumerate(keys_b) if any(is_unseen(c) for c in raw_of.get(k, ()))]
                un_correct += float(ok[sel].sum())
                un_positives += float((t.labels.cpu()[sel] == 1).sum())
                un_n += len(sel)
        itm_acc = correct / itm_n if itm_n else float("nan")  # no pair scored: no accuracy, not 0
        un_acc = un_correct / un_n if un_n else None
        matching = positives / itm_n if itm_n else None
        un_matching = un_positives / un_n if un_n else None
    return VLScore(retrieval, itm_acc, itm_n, unseen_retrieval, un_acc, un_n, matching, un_matching)
