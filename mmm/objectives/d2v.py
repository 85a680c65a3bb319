"""Self-distillation targets from an EMA teacher: data2vec (Baevski et al. 2022, "data2vec: A General
Framework for Self-supervised Learning in Speech, Vision and Language") and data2vec 2.0 (Baevski
et al. 2023, "Efficient Self-supervised Learning with Contextualized Target Representations for
Vision, Speech and Language").

A *teacher* -- a copy of the student's embedder and shared encoder -- reads the **unmasked** input.
Its weights are never trained: after every optimizer step they move towards the student's,
``teacher <- decay * teacher + (1 - decay) * student``, with ``decay`` annealed linearly from
``ema_decay`` to ``ema_end_decay`` over ``ema_anneal_steps`` updates (then held). The targets are
the average of the teacher's top-``top_k`` block outputs (the whole block output; the papers take each
block's feed-forward output before its last residual connection -- a deviation whose effect is not
measured), each normalised per token (parameter-free
layer norm; data2vec's choice for text and vision) or per sequence and channel (instance norm;
data2vec's choice for speech and data2vec 2.0's default), taken at the hidden positions only. The
student reads the masked input; a light head regresses the targets at those positions (MSE or
smooth L1):

* text and DNA tokens, audio frames, images in mask-token mode: the student's hidden states at the
  hidden positions go through a linear head, or a small Transformer decoder over the stream
  (``decoder_depth > 0``) and then a linear projection;
* images in drop-masked mode (``model.image.drop_masked: true``, data2vec 2.0's efficient student):
  the encoder saw only the visible patches; a light decoder receives their encodings scattered back
  onto the grid with a learned mask token at every hidden patch plus fixed 2-D sin-cos positions
  (MAE's layout; data2vec 2.0 uses a convolutional decoder here), and predicts the hidden patches'
  targets.

Precision: the teacher is kept in fp32 whatever the training precision -- a cast of the model to
bf16/fp16 (``precision: bf16-true``) leaves it in fp32 -- and the EMA update is computed in fp32 from
the student's weights. (A 0.9999 decay moves a weight by 1e-4 of the gap per step, far below bf16's
resolution of about 4e-3: an EMA kept in bf16 stops moving, the data2vec fp16 failure.) The teacher
runs in eval mode (no dropout) and under the ambient autocast, if any.

The teacher lives under this objective (``objectives.<label>.teacher.*`` in checkpoints, with its
update count), so a resumed run continues its EMA exactly; :func:`~mmm.encoders.load_encoder` and
the exports read only the student (``embedders.*`` and ``encoder.*``). It is filled with the
student's weights at the first step (after any warm start), not at construction, so it always
starts as the network that is actually trained.

One teacher pass per batch; several masks per sample sharing a pass (data2vec 2.0's multi-mask
trick) are not implemented.
"""
from __future__ import annotations

import copy
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import FeatureInput, ImageInput, PackedBatch, TokenInput
from mmm.config import EncoderConfig
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import PackedSeqInfo
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, modality_embedder, sole_input, zero_output
from mmm.objectives.grid_decoder import check_decoder_shape, decode_grid, decoder_blocks, grid_positions
from mmm.registry import OBJECTIVES

TARGET_NORMS = ("layer", "instance")
LOSSES = ("mse", "smooth_l1")


def ema_decay_at(step: int, start: float, end: float, anneal_steps: int) -> float:
    """The EMA decay at update ``step``: linear from ``start`` to ``end`` over ``anneal_steps``, then ``end``.

    Args:
        step: number of EMA updates done so far.
        start: decay at step 0 (data2vec: 0.999).
        end: decay from ``anneal_steps`` on (data2vec: 0.9999).
        anneal_steps: length of the ramp; 0 = ``end`` from the start.
    """
    if anneal_steps <= 0 or step >= anneal_steps:
        return float(end)
    return float(start + (end - start) * step / anneal_steps)


def instance_norm_packed(x: torch.Tensor, seq: PackedSeqInfo, eps: float = 1e-5) -> torch.Tensor:
    """Normalise each channel over the tokens of its own sequence (instance norm, no affine).

    Args:
        x: (N, d) packed tokens.
        seq: their layout.
        eps: variance floor.
    """
    lengths = seq.cu_seqlens.to(device=x.device, dtype=torch.long).diff()  # (S,) from the layout, no host copy
    owner = torch.repeat_interleave(torch.arange(len(seq.lengths), device=x.device), lengths,
                                    output_size=x.shape[0])  # (N,)
    count = lengths.to(x.dtype)[:, None]  # (S, 1)
    mean = x.new_zeros(len(seq.lengths), x.shape[1]).index_add_(0, owner, x) / count  # (S, d)
    centred = x - mean[owner]
    var = x.new_zeros(len(seq.lengths), x.shape[1]).index_add_(0, owner, centred * centred) / count
    return centred * torch.rsqrt(var[owner] + eps)


class TeacherState(NamedTuple):
    """The :class:`EMATeacher` buffers a step branches on, as host values."""

    initialized: bool
    updates: int
    uses_modality_vector: bool


def _forget_host_state(module: nn.Module, incompatible_keys) -> None:
    module._host = None


class EMATeacher(nn.Module):
    """A frozen fp32 copy of one modality's encoding path (embedder, shared encoder, modality vector).

    Its tensors never require gradients and stay fp32 when the model is cast (``_apply`` keeps
    floating tensors in fp32 and only follows device moves); it is always in eval mode. Buffers
    ``updates`` (EMA updates done) and ``initialized`` (filled from the student yet) are saved
    with it.

    Args:
        embedder: the student's embedder of the modality (deep-copied).
        encoder_cfg: the shared encoder's config (the teacher builds its own encoder from it).
        experts: the student encoder's number of modality experts (0 = none).
    """

    def __init__(self, embedder: nn.Module, encoder_cfg: EncoderConfig, experts: int = 0) -> None:
        super().__init__()
        self.embedder = copy.deepcopy(embedder)
        self.encoder = TransformerEncoder(encoder_cfg, experts=experts)
        self.register_buffer("modality_vector", torch.zeros(encoder_cfg.dim))
        self.register_buffer("uses_modality_vector", torch.zeros((), dtype=torch.bool))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._host: Optional[TeacherState] = TeacherState(False, 0, False)  # the buffers' values, on the host
        self.register_load_state_dict_post_hook(_forget_host_state)  # loaded buffers: read them again once
        self.requires_grad_(False)
        self.float()
        super().train(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        return super().train(False)  # the teacher never drops out

    def _apply(self, fn, *args, **kwargs):
        def device_only(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return fn(t)
            moved = fn(t.new_empty(0))  # where (and in which dtype) fn would put it
            return t.to(device=moved.device, dtype=torch.float32)

        return super()._apply(device_only, *args, **kwargs)

    def state(self) -> "TeacherState":
        """``initialized``, ``updates`` and ``uses_modality_vector`` as host values. Kept in step with the
        buffers, so a training step reads none of them from the device; read from the buffers once after
        a checkpoint is loaded into them."""
        if self._host is None:
            self._host = TeacherState(bool(self.initialized), int(self.updates), bool(self.uses_modality_vector))
        return self._host

    def tracked(self) -> List[Tuple[str, torch.Tensor]]:
        """(name, tensor) of every weight the EMA moves: embedder and encoder parameters."""
        return ([(f"embedder.{n}", p) for n, p in self.embedder.named_parameters()]
                + [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters()])

    @torch.no_grad()
    def copy_from(self, student: List[Tuple[str, torch.Tensor]], modality_vector: Optional[torch.Tensor]) -> None:
        """Set every tracked weight to the student's (names must match), and the modality vector."""
        mine = self.tracked()
        if [n for n, _ in mine] != [n for n, _ in student]:
            diff = sorted(set(n for n, _ in mine) ^ set(n for n, _ in student))[:6]
            raise ValueError(f"objective d2v: the teacher's weights do not mirror the student's (differing: {diff}); "
                             f"the teacher copies a plain embedder + encoder")
        before = self.state()  # read before the buffers change
        for (_, t), (_, s) in zip(mine, student):
            t.copy_(s.detach().float())
        if modality_vector is not None:
            self.modality_vector.copy_(modality_vector.detach().float())
            self.uses_modality_vector.fill_(True)
        self.initialized.fill_(True)
        self._host = before._replace(initialized=True,
                                     uses_modality_vector=before.uses_modality_vector or modality_vector is not None)

    @torch.no_grad()
    def ema_from(self, student: List[torch.Tensor], modality_vector: Optional[torch.Tensor], decay: float) -> None:
        """One EMA update in fp32: ``t <- decay * t + (1 - decay) * float32(s)`` for every tracked weight."""
        teacher = [t for _, t in self.tracked()]
        source = [s.detach().float() for s in student]
        if modality_vector is not None:
            teacher.append(self.modality_vector)
            source.append(modality_vector.detach().float())
        torch._foreach_mul_(teacher, decay)
        before = self.state()  # read before the buffer moves (after a load the mirror is read from the buffers)
        torch._foreach_add_(teacher, source, alpha=1.0 - decay)
        self.updates += 1
        self._host = before._replace(updates=before.updates + 1)


class StreamDecoder(nn.Module):
    """Linear (``depth`` 0) or a narrow Transformer over the packed stream, then a linear map to ``dim``."""

    def __init__(self, dim: int, encoder_cfg: EncoderConfig, depth: int, width: int, heads: int) -> None:
        super().__init__()
        self.blocks = None
        if depth:
            self.embed = nn.Linear(dim, width)
            self.blocks = decoder_blocks(width, depth, heads, encoder_cfg.attention)
        self.proj = nn.Linear(width if depth else dim, dim)

    def forward(self, hidden: torch.Tensor, seq: PackedSeqInfo, positions: torch.Tensor) -> torch.Tensor:
        """(N, d) stream → (M, d) predictions at ``positions`` (M,)."""
        if self.blocks is None:
            return self.proj(hidden.index_select(0, positions))
        out = self.blocks(self.embed(hidden), seq)  # (N, width)
        return self.proj(out.index_select(0, positions))


class GridDecoder(nn.Module):
    """Drop-masked images: visible encodings scattered onto the grid, mask tokens elsewhere, sin-cos
    positions, a narrow Transformer per image, a linear map to ``dim`` at the hidden patches."""

    def __init__(self, dim: int, embedder: nn.Module, encoder_cfg: EncoderConfig, depth: int, width: int,
                 heads: int) -> None:
        super().__init__()
        self.prefix = embedder.num_prefix_tokens  # the geometry, read once
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, width))
        self.register_buffer("pos", grid_positions(self.prefix, embedder.grid, width), persistent=False)
        self.blocks = decoder_blocks(width, depth, heads, encoder_cfg.attention)
        self.proj = nn.Linear(width, dim)

    def no_weight_decay(self) -> set:
        return {"mask_token"}

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, hidden_rows: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """(N_visible, d) encodings and the (B, P) mask → (M, d) predictions at the hidden patches (mask order).

        ``hidden_rows``: the hidden patches' (M,) indices into the B * P grid, when known
        (:meth:`~mmm.batch.ImageInput.hidden_positions`); else they are found from the mask.
        """
        out = decode_grid(self.embed(hidden), mask, self.prefix, self.mask_token, self.pos, self.blocks)  # (B, P, w)
        if hidden_rows is None:
            return self.proj(out[mask])  # (M, d)
        return self.proj(out.flatten(0, 1).index_select(0, hidden_rows))  # (M, d)


@OBJECTIVES.register("d2v")
class SelfDistillation(nn.Module):
    """data2vec-style regression of an EMA teacher's averaged top-K block outputs at hidden positions.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder; the modality's one is copied into the teacher).
        encoder_cfg: the shared encoder's config (given by the builder; the teacher's encoder is built from it).
        modality: the modality the objective reads (``text``, ``dna``, ``image``, ``audio``); its
            tokens must fill the batch's stream alone (config).
        top_k: teacher blocks averaged into the targets (data2vec: 8 of 12 for vision and text) (config).
        ema_decay: EMA decay at the first update (data2vec: 0.999) (config).
        ema_end_decay: EMA decay after the ramp (data2vec: 0.9999; 1.0 freezes the teacher) (config).
        ema_anneal_steps: updates over which the decay ramps linearly (config).
        target_norm: ``layer`` (per token, no affine) or ``instance`` (per sequence and channel) on
            each block's output before averaging (config).
        final_norm: a parameter-free layer norm on the averaged targets too (data2vec 2.0's
            ``layer_norm_targets``) (config).
        loss: ``mse`` or ``smooth_l1`` (config).
        loss_beta: smooth-L1 threshold (config).
        decoder_depth: Transformer blocks of the student's decoder; 0 = a linear head (mask-token
            modes only; drop-masked images need at least 1) (config).
        decoder_dim: the decoder's width (config).
        decoder_heads: the decoder's attention heads (config).
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 modality: str = "text", top_k: int = 4, ema_decay: float = 0.999, ema_end_decay: float = 0.9999,
                 ema_anneal_steps: int = 10000, target_norm: str = "layer", final_norm: bool = False,
                 loss: str = "mse", loss_beta: float = 1.0, decoder_depth: int = 0, decoder_dim: int = 128,
                 decoder_heads: int = 4) -> None:
        super().__init__()
        modality_embedder(embedders, modality, "d2v")
        if not 1 <= top_k <= encoder_cfg.depth:
            raise ValueError(f"objective d2v: top_k must be in [1, encoder depth {encoder_cfg.depth}], got {top_k}")
        if not (0.0 <= ema_decay <= 1.0 and 0.0 <= ema_end_decay <= 1.0) or ema_anneal_steps < 0:
            raise ValueError(f"objective d2v: ema_decay and ema_end_decay must lie in [0, 1] and ema_anneal_steps be "
                             f">= 0, got {ema_decay}, {ema_end_decay}, {ema_anneal_steps}")
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"objective d2v: target_norm must be one of {TARGET_NORMS}, got {target_norm!r}")
        if loss not in LOSSES:
            raise ValueError(f"objective d2v: loss must be one of {LOSSES}, got {loss!r}")
        check_decoder_shape("d2v", decoder_dim, decoder_depth, decoder_heads, min_depth=0)
        if not loss_beta > 0:
            raise ValueError(f"objective d2v: loss_beta must be > 0, got {loss_beta}")
        emb = embedders[modality]
        self.modality, self.top_k = modality, int(top_k)
        self.ema_decay, self.ema_end_decay, self.ema_anneal_steps = float(ema_decay), float(ema_end_decay), int(ema_anneal_steps)
        self.target_norm, self.final_norm = target_norm, bool(final_norm)
        self.loss, self.loss_beta = loss, float(loss_beta)
        experts = len(embedders) if encoder_cfg.experts else 0
        self.teacher = EMATeacher(emb, encoder_cfg, experts)
        self.expert = list(embedders).index(modality) if experts else None  # the model's modality order
        self.is_image = hasattr(emb, "visible_index")
        self.grid_decoder = None
        if self.is_image and decoder_depth:
            self.grid_decoder = GridDecoder(dim, emb, encoder_cfg, decoder_depth, decoder_dim, decoder_heads)
        self.decoder = StreamDecoder(dim, encoder_cfg, decoder_depth, decoder_dim, decoder_heads)

    def reset_parameters(self) -> None:
        """The grid decoder's mask token: N(0, 0.02) (the builder's init covers the linear layers)."""
        if self.grid_decoder is not None:
            self.grid_decoder.reset_parameters()

    # ------------------------------------------------------------------ the teacher

    def _student(self, model: nn.Module) -> Tuple[List[Tuple[str, torch.Tensor]], Optional[torch.Tensor]]:
        """The student's tracked weights (named as the teacher's) and its modality vector, if any."""
        emb = model.embedders[self.modality]
        named = ([(f"embedder.{n}", p) for n, p in emb.named_parameters()]
                 + [(f"encoder.{n}", p) for n, p in model.encoder.named_parameters()])
        vector = None
        if getattr(model, "modality_embed", None) is not None:
            vector = model.modality_embed.weight[model.modality_ids[self.modality]]
        return named, vector

    def sync_teacher(self, model: nn.Module) -> None:
        """Fill the teacher with the student's current weights (done once, at the first step)."""
        named, vector = self._student(model)
        self.teacher.copy_from(named, vector)

    def current_decay(self) -> float:
        """The decay the next EMA update uses."""
        return ema_decay_at(self.teacher.state().updates, self.ema_decay, self.ema_end_decay, self.ema_anneal_steps)

    def before_scoring(self, model: nn.Module, batch: PackedBatch) -> None:
        """Fill the teacher with the student at the first batch of this head's modality (called by the
        model before each pass this head scores; after any warm start, before any optimizer step)."""
        if self.modality in batch.inputs and not self.teacher.state().initialized:
            self.sync_teacher(model)

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Move the teacher towards the student (called by the model after every optimizer step)."""
        if not self.teacher.state().initialized:
            self.sync_teacher(model)
            return
        named, vector = self._student(model)
        self.teacher.ema_from([p for _, p in named], vector, self.current_decay())

    @torch.no_grad()
    def targets(self, batch: PackedBatch) -> torch.Tensor:
        """(M, d) float32 targets at the hidden positions of ``batch``'s modality, in the order the
        student's predictions come in (stream order; mask order for images)."""
        inp = batch.inputs[self.modality]
        teacher = self.teacher
        hidden_rows, seq = self._teacher_layout(batch)
        if isinstance(inp, TokenInput):
            t = batch.targets[self.modality]
            x = teacher.embedder(inp.ids.index_copy(0, t.positions, t.labels), inp.position_ids)  # unmasked ids
        elif isinstance(inp, FeatureInput):
            x = teacher.embedder(inp.features.float(), inp.position_ids, None)
        else:
            x, _ = teacher.embedder(inp.pixels.float())  # (B*T, d) every patch
        if teacher.state().uses_modality_vector:
            x = x + teacher.modality_vector.to(x.dtype)
        layers = teacher.encoder.block_outputs(x, seq, modality=self.expert)[-self.top_k:]
        total = None
        for h in layers:
            h = h.float()
            if self.target_norm == "instance":
                h = instance_norm_packed(h, seq).index_select(0, hidden_rows)
            else:
                h = F.layer_norm(h.index_select(0, hidden_rows), h.shape[-1:])
            total = h if total is None else total + h
        target = total / len(layers)
        return F.layer_norm(target, target.shape[-1:]) if self.final_norm else target

    def _teacher_layout(self, batch: PackedBatch) -> Tuple[torch.Tensor, PackedSeqInfo]:
        """Rows of the teacher's stream that are hidden for the student, and that stream's layout."""
        inp = batch.inputs[self.modality]
        if isinstance(inp, TokenInput):
            return batch.targets[self.modality].positions, batch.seq
        if isinstance(inp, FeatureInput):
            return inp.hidden_positions(), batch.seq
        emb = self.teacher.embedder
        b, t = inp.num_images, emb.num_prefix_tokens + emb.num_patches
        return (inp.hidden_token_rows(emb.num_prefix_tokens),  # row-major = the order of pixels[mask]
                PackedSeqInfo.from_seqlens([t] * b, device=inp.mask.device))

    # ------------------------------------------------------------------ the student

    def _hidden_count(self, batch: PackedBatch) -> int:
        inp = batch.inputs[self.modality]
        if isinstance(inp, TokenInput):
            t = batch.targets.get(self.modality)
            return 0 if t is None else int(t.positions.numel())
        if inp.mask is None:
            return 0
        return int(inp.mask.sum()) if inp.hidden_count is None else inp.hidden_count

    def predictions(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """(M, d) the student's predictions at the hidden positions (same order as :meth:`targets`)."""
        inp = batch.inputs[self.modality]
        if isinstance(inp, ImageInput) and inp.drop_masked:
            if self.grid_decoder is None:
                raise ValueError("objective d2v: drop-masked images (model.image.drop_masked: true) need a decoder "
                                 "over the grid; set decoder_depth >= 1")
            return self.grid_decoder(hidden, inp.mask, inp.hidden_positions())
        if isinstance(inp, ImageInput):
            positions = inp.hidden_token_rows(self.teacher.embedder.num_prefix_tokens)
        elif isinstance(inp, FeatureInput):
            positions = inp.hidden_positions()
        else:
            positions = batch.targets[self.modality].positions
        return self.decoder(hidden, batch.seq, positions)

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        names = ("target_var", "pred_var", "ema_decay")
        inp = sole_input(batch, self.modality, "d2v")
        if inp is None:
            return zero_output(hidden, self, names)
        if self._hidden_count(batch) == 0:
            return zero_output(hidden, self, names)
        pred = self.predictions(hidden, batch).float()  # (M, d)
        target = self.targets(batch)  # (M, d), no gradient
        count, d = int(target.shape[0]), target.shape[1]
        if self.loss == "mse":
            loss_sum = F.mse_loss(pred, target, reduction="sum") / d
        else:
            loss_sum = F.smooth_l1_loss(pred, target, reduction="sum", beta=self.loss_beta) / d
        metrics = {"target_var": target.var(0).mean().detach(), "pred_var": pred.detach().var(0).mean(),
                   "ema_decay": pred.new_full((), self.current_decay())}
        return ObjectiveOutput(global_mean(loss_sum, count, in_lockstep(self)), metrics, count)
