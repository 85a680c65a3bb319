"""CLIP-style image-text contrastive learning (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision") with the shared encoder as both towers.

The batch holds B images and their B captions, each its own sequence
(:class:`~mmm.batch.ContrastiveTargets`). A caption's embedding is a linear projection of its
[CLS] hidden state; an image's is a projection of the mean of its token hidden states (patches
or regions; pooled with ``index_add``). Both are L2-normalised, scaled by a learned temperature
(``logit_scale`` stored as a log, initialised to 1/0.07; the parameter is clamped at log 100 after every
optimizer step, as CLIP does), and
scored with the symmetric InfoNCE loss of ``open_clip.loss.ClipLoss``, which gathers the
embeddings of every rank (with gradients) under ``torch.distributed``.

Under DDP the loss is the one over the gathered global batch, not a count-normalised sum like the
other heads': every rank scores all pairs (``local_loss: false``; each rank logs the same loss),
and the gather's backward sums every rank's gradient, which DDP's averaging turns back into the
gradient of that one loss. With ``local_loss: true`` each rank scores its own rows against all
columns and the ranks' mean is the global loss only when every rank holds the same number of
pairs, which the gather needs anyway (every rank must bring the same batch size). Validation
gathers nothing: each batch is scored against its own pairs, as on one process.

Soft targets (LightCLIP, Nie et al. 2023, "LightCLIP: Learning Multi-Level Interaction for
Lightweight Vision-Language Models"): image-text pairs are not strictly one-to-one -- in the
embedded set many images share one caption text -- so the one-hot target can be replaced by

* ``duplicate_captions: true``: the target's positive mass is spread evenly over every in-batch
  caption whose token ids equal the pair's own (and, for a caption, over every image paired with
  such a caption); captions are compared by a hash of their ids, gathered across ranks;
* ``label_smoothing: e`` with ``smoothing_steps: S``: LightCLIP's progressive softening of the
  negatives -- a share ``e_t = e * min(1, t / S)`` of the target moves evenly onto the negatives,
  ``t`` the optimizer steps taken (``S = 0``: ``e`` from the start); the step count is a buffer
  of the head, so a resumed run continues the schedule.

Each direction is then a cross-entropy against that distribution (the mean of the two, as CLIP's).
With neither option the head is exactly CLIP's (``open_clip.loss.ClipLoss``); with them on, the
same logits (local or gathered, as ``local_loss`` says) are scored against the soft targets.

:meth:`ImageTextContrastive.embed_pairs` gives the normalised embeddings for retrieval evaluation.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmm.batch import ContrastiveTargets, PackedBatch, TokenInput
from mmm.config import EncoderConfig
from mmm.objectives.base import ObjectiveOutput, full_precision, in_lockstep, zero_output
from mmm.registry import OBJECTIVES


def mean_pool(tokens: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """(R, d) tokens, (R,) owner in [0, count) → (count, d) per-owner means (zero for an owner without tokens)."""
    sums = tokens.new_zeros(count, tokens.shape[-1]).index_add(0, owner, tokens)  # (B, d)
    n = tokens.new_zeros(count).index_add_(0, owner, tokens.new_ones(owner.shape[0])).clamp_min(1)  # (B,) no bincount: its size is read back
    return sums / n[:, None]


_HASH_MODULI = (2_147_483_647, 2_147_483_629)  # two primes below 2**31: ids * weights stay inside int64
_HASH_BASES = (1_000_003, 998_244_353)


def powers_mod(base: int, count: int, mod: int, device: torch.device) -> torch.Tensor:
    """(count,) int64 ``base ** (i + 1) % mod`` for i = 0 … count - 1, computed on ``device`` by
    square-and-multiply over the exponents' bits (no list of Python values copied over: on CUDA that
    copy would block). ``mod`` < 2**31, so every product fits in int64."""
    exponent = torch.arange(1, count + 1, device=device)
    out = torch.ones(count, dtype=torch.long, device=device)
    square = base % mod
    for _ in range(max(count, 1).bit_length()):
        out = torch.where(exponent % 2 == 1, out * square % mod, out)
        exponent = exponent // 2
        square = square * square % mod
    return out


def caption_keys(batch: PackedBatch, text_positions: torch.Tensor, text_input: str = "text") -> torch.Tensor:
    """(B,) int64 key of each caption's token ids (equal ids → equal key; different → different but
    with a ~2**-62 chance), computed on the device without a host sync. The key depends on the ids
    alone, not on the batch (its longest sequence), so keys gathered from several ranks compare.

    Args:
        batch: the contrastive batch; its ``text_input`` :class:`~mmm.batch.TokenInput` holds the ids.
        text_positions: (B,) stream position of each caption's first token (its sequence's start).
        text_input: the batch input holding the caption ids.
    """
    inp = batch.inputs.get(text_input)
    if not isinstance(inp, TokenInput):
        raise ValueError(f"objective itc: duplicate_captions compares caption token ids, but the batch has no "
                         f"{text_input!r} token input (inputs: {sorted(batch.inputs)})")
    device = inp.ids.device
    n = batch.num_tokens
    stream = torch.zeros(n, dtype=torch.long, device=device)  # 0 = not a caption token
    index = inp.index if inp.index is not None else torch.arange(n, device=device)
    stream = stream.index_copy(0, index, inp.ids.long() + 1)  # (N,) ids shifted to >= 1
    cu = batch.seq.cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.searchsorted(cu, text_positions.to(device), right=True) - 1  # (B,) sequence of each caption
    start, length = cu[seq], cu[seq + 1] - cu[seq]
    width = batch.seq.max_seqlen
    offset = torch.arange(width, device=device)  # (L,)
    rows = (start[:, None] + offset).clamp(max=n - 1)  # (B, L)
    ids = torch.where(offset < length[:, None], stream[rows], torch.zeros_like(rows))  # (B, L)
    key = torch.zeros(ids.shape[0], dtype=torch.long, device=device)
    for mod, base in zip(_HASH_MODULI, _HASH_BASES):
        weights = powers_mod(base, width, mod, device)  # (L,) base**(i+1) % mod, made on the device
        h = ((ids % mod) * weights % mod).sum(1) % mod  # (B,) each term < 2**31, the sum < 2**40
        h = (h + length) % mod  # base**0: no position's weight, and the same on every rank whatever its width
        key = key * mod + h
    return key


def soft_targets(same: torch.Tensor, smoothing: Union[float, torch.Tensor]) -> torch.Tensor:
    """(R, C) target distribution: ``1 - smoothing`` spread over each row's positives (``same``), the
    rest over its negatives (all of it on the positives when a row has no negative).

    Args:
        same: (R, C) bool, True where column c is a positive of row r (at least one per row).
        smoothing: share of each row's mass moved onto its negatives, in [0, 1) (a float or a 0-d tensor).
    """
    pos = same.float()
    neg = 1.0 - pos
    n_pos = pos.sum(1, keepdim=True).clamp_min(1.0)
    n_neg = neg.sum(1, keepdim=True)
    eps = (n_neg > 0).float() * smoothing  # (R, 1)
    return (1.0 - eps) * pos / n_pos + eps * neg / n_neg.clamp_min(1.0)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_c target[r, c] * log_softmax(logits)[r, c]``. (R, C), (R, C) → scalar."""
    return -(target * logits.float().log_softmax(-1)).sum(-1).mean()


@OBJECTIVES.register("itc")
class ImageTextContrastive(nn.Module):
    """Projections, learned temperature and the CLIP loss over in-batch (and cross-rank) pairs.

    Args:
        dim, embedders, encoder_cfg: given by the model builder (see :mod:`mmm.objectives.base`).
        embed_dim: size of the joint embedding space; None = ``dim``.
        init_temperature: initial softmax temperature (CLIP: 0.07, i.e. logit scale 14.3).
        max_logit_scale: clamp of the logit scale (CLIP: 100).
        local_loss: with several ranks, score only this rank's rows against all (open_clip's
            ``local_loss``; less memory, same gradient); False = every rank computes the full matrix.
        target: key of the :class:`~mmm.batch.ContrastiveTargets` in ``batch.targets``.
        duplicate_captions: LightCLIP-style soft positives: every in-batch caption with the same
            token ids as the pair's own counts as a positive (the target mass split evenly).
        label_smoothing: share of the target moved onto the negatives once the schedule is done
            (LightCLIP's softened negatives), in [0, 1); 0 = none.
        smoothing_steps: optimizer steps over which that share ramps linearly from 0; 0 = the full
            share from the first step.
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 embed_dim: Optional[int] = None, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 local_loss: bool = False, target: str = "itc", duplicate_captions: bool = False,
                 label_smoothing: float = 0.0, smoothing_steps: int = 0) -> None:
        super().__init__()
        from open_clip.loss import ClipLoss

        if not 0 < init_temperature or not 1.0 / init_temperature <= max_logit_scale:
            raise ValueError(f"objective itc: need 0 < init_temperature and 1/init_temperature ≤ max_logit_scale; got "
                             f"init_temperature={init_temperature}, max_logit_scale={max_logit_scale}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"objective itc: label_smoothing must lie in [0, 1), got {label_smoothing!r}")
        if int(smoothing_steps) != smoothing_steps or smoothing_steps < 0:
            raise ValueError(f"objective itc: smoothing_steps must be an integer >= 0, got {smoothing_steps!r}")
        if not isinstance(duplicate_captions, bool):
            raise ValueError(f"objective itc: duplicate_captions must be true or false, got {duplicate_captions!r}")
        self.duplicate_captions, self.label_smoothing = duplicate_captions, float(label_smoothing)
        self.smoothing_steps = int(smoothing_steps)
        self.soft = duplicate_captions or self.label_smoothing > 0
        if self.soft:  # optimizer steps taken (the smoothing schedule), saved with the head
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.embed_dim = int(embed_dim or dim)
        self.init_temperature, self.max_logit_scale, self.target = init_temperature, float(max_logit_scale), target
        self.image_proj = nn.Linear(dim, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(dim, self.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP initialisation: projections N(0, dim^-1/2), logit scale log(1/init_temperature)."""
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1.0 / self.init_temperature))

    def smoothing(self) -> torch.Tensor:
        """0-d float: the negatives' share of the target at the current step (LightCLIP's progressive
        softening), computed on the step counter's device (no host sync)."""
        if not self.soft:
            raise RuntimeError("objective itc: smoothing() needs duplicate_captions or label_smoothing")
        if self.smoothing_steps == 0:
            return torch.full((), self.label_smoothing, device=self.steps.device)
        return self.label_smoothing * (self.steps.float() / self.smoothing_steps).clamp(max=1.0)

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Clamp the learned temperature's parameter at ``log(max_logit_scale)``, as CLIP does after each optimizer
        step, and advance the smoothing schedule (the model calls this after every optimizer step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))
        if self.soft:
            self.steps += 1

    def soft_loss(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, keys: torch.Tensor,
                  rank: int, world_size: int) -> torch.Tensor:
        """Symmetric cross-entropy against soft targets on the same logits ``ClipLoss`` would score.

        Args:
            image: (B, E) this rank's normalised image embeddings.
            text: (B, E) this rank's normalised caption embeddings.
            scale: the logit scale.
            keys: (B,) caption keys (:func:`caption_keys`); ignored without ``duplicate_captions``.
            rank: this rank.
            world_size: number of ranks (1 = no gathering).
        """
        logits_image, logits_text = self.loss_fn.get_logits(image, text, scale)  # (R, C) each
        rows, cols = logits_image.shape
        b = image.shape[0]
        first_row = rank * b if world_size > 1 and self.loss_fn.local_loss else 0
        if self.duplicate_captions:
            all_keys = keys
            if world_size > 1:
                parts = [torch.empty_like(keys) for _ in range(world_size)]
                dist.all_gather(parts, keys)
                all_keys = torch.cat(parts)  # (C,)
            row_keys = all_keys[first_row:first_row + rows]
            same = row_keys[:, None] == all_keys[None, :]  # (R, C)
        else:
            own = torch.arange(rows, device=image.device) + first_row
            same = own[:, None] == torch.arange(cols, device=image.device)[None, :]
        target = soft_targets(same, self.smoothing().to(logits_image.device))
        return (soft_cross_entropy(logits_image, target) + soft_cross_entropy(logits_text, target)) / 2

    def scale(self) -> torch.Tensor:
        """The logit scale ``exp(logit_scale)``, its value capped at ``max_logit_scale``. The gradient passes the cap
        (straight through): a scale at the cap that the loss wants lower must still get that gradient, or it would
        stay at the cap for good; :meth:`after_optimizer_step` clamps the parameter itself, as CLIP does."""
        s = self.logit_scale.exp()
        return s + (s.clamp(max=self.max_logit_scale) - s).detach()

    def embed_pairs(self, hidden: torch.Tensor, targets: ContrastiveTargets) -> Tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised ``(image_emb (B, E), text_emb (B, E))`` in float32; row ``i`` of each is pair ``i``.

        Args:
            hidden: (N, d) encoder output of the batch.
            targets: its :class:`~mmm.batch.ContrastiveTargets`.
        """
        b = targets.count
        text = hidden.index_select(0, targets.text_positions)  # (B, d)
        image = mean_pool(hidden.index_select(0, targets.image_positions).float(), targets.image_owner, b)  # (B, d)
        image_emb = F.normalize(self.image_proj(image.to(text.dtype)).float(), dim=-1)  # (B, E)
        text_emb = F.normalize(self.text_proj(text).float(), dim=-1)  # (B, E)
        return image_emb, text_emb

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → symmetric contrastive loss and in-batch retrieval accuracies."""
        t = batch.targets.get(self.target)
        if t is None or t.count == 0:
            # no count all-reduce: ClipLoss gathers embeddings instead (see the module docstring)
            return zero_output(hidden, self, ("i2t_acc", "t2i_acc", "logit_scale") + (("smoothing",) if self.soft else ()),
                               sync_count=False)
        if not isinstance(t, ContrastiveTargets):
            raise TypeError(f"objective itc: batch.targets[{self.target!r}] is a {type(t).__name__}, "
                            f"expected ContrastiveTargets")
        image, text = self.embed_pairs(hidden, t)  # (B, E), (B, E)
        scale = self.scale()
        # gather only in training steps (every rank takes them); validation scores each batch's own pairs,
        # as one process does, since ranks may hold different numbers of validation batches
        distributed = in_lockstep(self) and dist.is_available() and dist.is_initialized()
        self.loss_fn.rank = dist.get_rank() if distributed else 0
        self.loss_fn.world_size = dist.get_world_size() if distributed else 1
        keys = caption_keys(batch, t.text_positions) if self.soft and self.duplicate_captions else None
        with full_precision(image.device):  # logits up to 100: bf16 would round them by up to 0.25
            image, text, scale = image.float(), text.float(), scale.float()
            if self.soft:
                loss = self.soft_loss(image, text, scale, keys, self.loss_fn.rank, self.loss_fn.world_size)
            else:
                loss = self.loss_fn(image, text, scale)
            with torch.no_grad():
                logits = image @ text.T  # (B, B) local pairs; the scale does not change the argmax
                truth = torch.arange(t.count, device=logits.device)
                metrics = {"i2t_acc": (logits.argmax(1) == truth).float().mean(),
                           "t2i_acc": (logits.argmax(0) == truth).float().mean(),
                           "logit_scale": scale.detach()}
                if self.soft:
                    metrics["smoothing"] = self.smoothing().to(logits.device)
        return ObjectiveOutput(loss, metrics, t.count)
