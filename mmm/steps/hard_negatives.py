"""Hard negatives for image-text matching, mined by contrastive similarity (ALBEF, Li et al. 2021,
Sec. 3.2; UNITER's ITM-hard, Chen et al. 2020).

On a contrastive (``itc``) batch the captions and images are encoded alone. The strategy takes the
contrastive head's image-caption similarities on that pass, draws for every image a non-matching
caption and for every caption a non-matching image with probability ∝ softmax(scale ·
similarity) (a caption never counts as a negative of an image it describes: one of the image's
captions, or the same text), re-pairs the B positives and
the 2B negatives into joint sequences (:func:`mmm.modalities.image_text.pairing.joint_pairs`,
UNITER's single-stream layout) and encodes them with the model's encoder in the same step. The
ITM head then scores that batch like any other: it never sees the model.

Training draws from torch's global generator (seeded by the run). Validation (the contrastive head in eval
mode) draws from a generator of its own with a fixed seed, so a batch gets the same negatives on every
validation pass, as the data side's ITM negatives do, and validating does not move the training draws.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mmm.batch import PackedBatch
from mmm.modalities.image_text.pairing import joint_pairs
from mmm.objectives.base import full_precision
from mmm.registry import STEPS

SOURCE = "itc"  # the contrastive targets mining reads (joint_pairs reads the same key)


EVAL_SEED = 0
"""Seed of the generator validation mining draws from (a new one per batch)."""


def _draw(logits: torch.Tensor, allowed: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(R,) one column per row, drawn ∝ softmax(logits); a row whose similarities are not finite (a diverged
    step: its loss is not finite either, and trainer.nonfinite_loss decides) draws uniformly among ``allowed``."""
    probs = logits.softmax(-1)
    probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, allowed.float())
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _take(logits: torch.Tensor, rows: List[int]) -> torch.Tensor:
    """The given rows of ``logits``; all of them (the usual case: every caption distinct) without a copy."""
    if rows == list(range(logits.shape[0])):
        return logits
    return logits.index_select(0, torch.tensor(rows).to(logits.device, non_blocking=True))


@STEPS.register("itm_hard_negatives")
class HardNegativeMining:
    """Mine ITM negatives from the contrastive head's similarities and encode them jointly.

    Args:
        head: the ITM head this strategy feeds (named in errors).
        heads: every head of the model, by name (the similarity head is looked up here).
        two_stream: the model fuses paired sequences (``model.image_text.layout: two_stream``); refused.
        similarity_head: the contrastive head whose projections rank the candidates (``embed_pairs``,
            ``scale``).
        target: key of the ITM head's pair targets (a batch that has them is scored as it is; the mined
            batch carries them under this key).
    """

    def __init__(self, head: str, heads: Dict[str, nn.Module], two_stream: bool = False,
                 similarity_head: str = "itc", target: str = "itm") -> None:
        if two_stream:
            raise ValueError(f"objective {head}: negatives: hard re-pairs into the single-stream layout; it does "
                             f"not support model.image_text.layout: two_stream yet")
        if similarity_head not in heads:
            raise ValueError(f"objective {head}: negatives: hard ranks candidates with the {similarity_head!r} head, "
                             f"which the model lacks (heads: {list(heads)}); set similarity_head to a contrastive "
                             f"head of the run")
        if not callable(getattr(heads[similarity_head], "embed_pairs", None)):
            raise ValueError(f"objective {head}: similarity_head {similarity_head!r} is a "
                             f"{type(heads[similarity_head]).__name__}, which embeds no image-caption pairs; name a "
                             f"contrastive head (e.g. itc)")
        self.head, self.similarity_head, self.target = head, similarity_head, target

    def applies(self, batch: PackedBatch) -> bool:
        """A contrastive batch without pairs of its own (an ``itm`` batch keeps its in-batch negatives)."""
        return self.target not in batch.targets and SOURCE in batch.targets

    def __call__(self, model: nn.Module, hidden: torch.Tensor, batch: PackedBatch) -> Tuple[torch.Tensor, PackedBatch]:
        """The mined joint batch and its encoder output, (N', d), for the ITM head.

        Args:
            model: the :class:`~mmm.model.MaskedModel` running the step (its encoder encodes the pairs).
            hidden: (N, d) the shared pass over ``batch``.
            batch: the contrastive batch.
        """
        joint = self.mine(model.objectives[self.similarity_head], hidden, batch)
        return model.encode(joint), joint  # (N', d) the positives and the mined negatives, jointly

    @torch.no_grad()
    def mine(self, similarity: nn.Module, hidden: torch.Tensor, batch: PackedBatch) -> PackedBatch:
        """The B matched pairs, then per image a caption and per caption an image drawn ∝ softmax(similarity)
        among the non-matching ones (an image's own captions, and captions of identical text, excluded), as
        one joint batch whose ``extras["pairs"]`` gives each pair's caption and image index.

        Args:
            similarity: the contrastive head.
            hidden: (N, d) encoder output of ``batch``.
            batch: the contrastive batch (B captions, then B images).
        """
        image, text = similarity.embed_pairs(hidden, batch.targets[SOURCE])  # (B, E), (B, E)
        with full_precision(image.device):  # scaled by up to 100: not in bf16
            sim = image.float() @ text.float().T  # (B images, B captions)
        b = sim.shape[0]
        captions = batch.extras.get("caption_keys") or batch.extras.get("captions") or [str(i) for i in range(b)]
        described = batch.extras.get("image_captions") or [frozenset() for _ in range(b)]
        # (B images, B captions) on the host: which pairs may not be negatives
        same = [[y == captions[i] or y in described[i] for y in captions] for i in range(b)]
        scale = similarity.scale().float() if hasattr(similarity, "scale") else 1.0  # a tensor: no read of its value
        excluded = torch.tensor(same).to(sim.device, non_blocking=True)  # (B, B)
        logits = (sim * scale).masked_fill(excluded, float("-inf"))
        rows = [i for i in range(b) if not all(same[i])]  # images with at least one non-matching caption
        cols = [j for j in range(b) if not all(row[j] for row in same)]  # captions with a non-matching image
        drawn = []
        gen = None if similarity.training else torch.Generator(device=sim.device).manual_seed(EVAL_SEED)
        if rows:
            drawn.append(_draw(_take(logits, rows), _take(~excluded, rows), gen))
        if cols:
            drawn.append(_draw(_take(logits.T, cols), _take(~excluded.T, cols), gen))
        # the one read of a mining step: the joint batch's layout depends on which caption/image was drawn
        picks = torch.cat(drawn).tolist() if drawn else []
        text_of = list(range(b)) + picks[:len(rows)] + cols
        image_of = list(range(b)) + rows + picks[len(rows):]
        labels = [1] * b + [0] * (len(text_of) - b)
        vision_key = next(k for k in batch.inputs if k != "text")  # image (patches) or regions
        joint = joint_pairs(batch, text_of, image_of, labels, vision_key)
        joint.extras["pairs"] = {"text": text_of, "image": image_of}  # caption / image index of each joint pair
        if self.target != "itm":
            joint.targets[self.target] = joint.targets.pop("itm")
        return joint
