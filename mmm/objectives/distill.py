"""Distillation from a frozen teacher encoder at the visible tokens, beside the usual masked loss.

Two papers ask for the same mechanism in continued ("further") pretraining:

* Self-distillation for further pretraining (Lee et al. 2023, "Self-Distillation for Further
  Pre-training of Transformers"): the initial pretrained model is further pretrained on the target
  data and then frozen as the *teacher*; the same initial model, as the *student*, is trained with
  the masked objective while its hidden representations are pulled towards the teacher's -- a
  regulariser against overfitting the small target set.
* HAD (Hybrid Architecture Distillation, genomic sequence modeling): a frozen large DNA model is the
  teacher; the student aligns its feature embeddings of the *visible* tokens with the teacher's
  while reconstructing the hidden ones (MLM).

Here the teacher is any encoder :func:`mmm.encoders.load_encoder` reads for the modality -- an mmm
checkpoint, a :func:`~mmm.encoders.save_encoder` folder, an HF BERT folder (text) or a timm ViT
weights file (image, with ``timm_model``) -- run on the same packed batch as the student. The loss
compares the student's final hidden states with the teacher's at the visible tokens only (for
text/DNA: every token that is not an MLM target; images: [CLS] and the visible patches; audio: the
unmasked frames), as MSE per token (mean over channels) or one minus the cosine, averaged over those
tokens. The masked tokens are the masked objective's business; its head sits beside this one, and
this head's ``weight`` in ``objectives`` sets the balance.

``teacher_input``: ``masked`` (default) gives the teacher the very input the student reads, so a
student initialised from the teacher starts at exactly zero distillation loss and the term only
measures drift; ``full`` gives it the unmasked input (MLM targets restored, every patch or frame),
the HAD reading, where even visible tokens differ at the start because the teacher saw the context.

The teacher is frozen: its weights never require gradients, it runs under ``torch.no_grad`` in eval
mode with fp32 weights whatever the training precision (a ``bf16-true`` cast of the model leaves it alone; under
``bf16-mixed`` it computes in the ambient autocast, as the student does), and it is held outside the module tree (like
:class:`mmm.targets.teacher.FrozenTeacher`), so it is in neither the ``state_dict`` (checkpoints,
exports) nor the optimizer; it follows the batch to its device lazily. When the teacher is wider or
narrower than the student (``teacher_dim``), a learned linear map takes the student's states to the
teacher's width.

The teacher file is read at the first training or validation step, not when the head is built, so
a model rebuilt from a run's config (to evaluate it, or to check a preset) does not need it; the
teacher is then checked against the student (vocabulary, patch grid or feature size, width).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import FeatureInput, PackedBatch, TokenInput
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo, mask_positions
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, modality_embedder, sole_input, zero_output
from mmm.registry import OBJECTIVES

TEACHER_INPUTS = ("masked", "full")
LOSSES = ("mse", "cosine")
TARGET_NORMS = ("none", "layer")
_SPEC_KEYS = {"path", "timm_model", "timm_kwargs"}


def parse_teacher_spec(spec: Union[str, Path, Mapping[str, Any]]) -> Tuple[Path, Dict[str, Any]]:
    """``(path, load_encoder options)`` of a ``teacher`` argument: a path, or ``{path, timm_model, timm_kwargs}``."""
    if isinstance(spec, (str, Path)):
        spec = {"path": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"objective distill: teacher must be a path or a mapping {{path, timm_model, timm_kwargs}}, "
                         f"got {type(spec).__name__}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"objective distill: unknown teacher keys {sorted(unknown)}; expected some of {sorted(_SPEC_KEYS)}")
    if not spec.get("path"):
        raise ValueError("objective distill: teacher.path is required (an mmm .ckpt, a saved encoder folder, an HF "
                         "BERT folder, or a timm weights file with teacher.timm_model)")
    options = {"timm_model": spec.get("timm_model"), "timm_kwargs": spec.get("timm_kwargs")}
    return Path(spec["path"]), {k: v for k, v in options.items() if v is not None}


def load_teacher(spec: Union[str, Path, Mapping[str, Any]], modality: str) -> nn.Module:
    """The frozen standalone encoder (``.embedder`` + ``.encoder``) a ``teacher`` spec names, fp32, eval mode."""
    from mmm.encoders import load_encoder

    path, options = parse_teacher_spec(spec)
    if not path.exists():
        raise FileNotFoundError(f"objective distill: teacher.path {path} does not exist (teachers load local files "
                                f"only)")
    try:
        enc = load_encoder(path, modality=modality, **options)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"objective distill: cannot load the {modality!r} teacher from {path}: {e}") from None
    if not hasattr(enc, "embedder") or not hasattr(enc, "encoder"):
        raise ValueError(f"objective distill: the {modality!r} encoder from {path} has no embedder + encoder parts")
    return enc.float().eval().requires_grad_(False)


class _Frozen:
    """Holds the teacher outside the module tree: not in ``state_dict``, ``parameters()`` or ``train()``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def on(self, device: torch.device) -> nn.Module:
        first = next(self.module.parameters(), None)
        if first is not None and first.device != device:
            self.module.to(device)
        return self.module


@OBJECTIVES.register("distill")
class FrozenTeacherDistillation(nn.Module):
    """Align the student's hidden states with a frozen teacher's at the visible tokens.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder; checked against the teacher's).
        encoder_cfg: the shared encoder's config (given by the builder; unused).
        teacher: the teacher: a path (mmm ``.ckpt``, saved encoder folder, HF BERT folder) or
            ``{path, timm_model, timm_kwargs}`` for a timm ViT weights file (config).
        modality: the modality both read; its tokens must fill the batch's stream alone (config).
        teacher_input: ``masked`` (the student's input) or ``full`` (the unmasked input) (config).
        loss: ``mse`` (per token, mean over channels) or ``cosine`` (1 - cosine similarity) (config).
        target_norm: ``none``, or ``layer``: a parameter-free layer norm on both sides first (config).
        projection: map the student's states to the teacher's width with a learned linear layer;
            None = only when the widths differ (config).
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: Optional[EncoderConfig] = None,
                 teacher: Union[str, Mapping[str, Any], None] = None, modality: str = "text",
                 teacher_input: str = "masked", loss: str = "mse", target_norm: str = "none",
                 teacher_dim: Optional[int] = None) -> None:
        super().__init__()
        modality_embedder(embedders, modality, "distill")
        if teacher is None:
            raise ValueError("objective distill: args.teacher is required (a path, or {path, timm_model, timm_kwargs})")
        parse_teacher_spec(teacher)  # the spec's shape now; the file at the first step
        if teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"objective distill: teacher_input must be one of {TEACHER_INPUTS}, got {teacher_input!r}")
        if loss not in LOSSES:
            raise ValueError(f"objective distill: loss must be one of {LOSSES}, got {loss!r}")
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"objective distill: target_norm must be one of {TARGET_NORMS}, got {target_norm!r}")
        if teacher_dim is not None and (not isinstance(teacher_dim, int) or teacher_dim < 1):
            raise ValueError(f"objective distill: teacher_dim must be a positive integer or null, got {teacher_dim!r}")
        self.modality, self.teacher_input, self.loss, self.target_norm = modality, teacher_input, loss, target_norm
        self.teacher_spec = teacher
        self.student_reads = _reads(embedders[modality])  # numbers the teacher must match, checked when it loads
        self.teacher_dim = int(teacher_dim or dim)
        self.proj = nn.Linear(dim, self.teacher_dim) if self.teacher_dim != dim else None
        self._frozen: Optional[_Frozen] = None

    @property
    def teacher(self) -> _Frozen:
        """The frozen teacher, read from its file on first use and checked against the student."""
        if self._frozen is None:
            module = load_teacher(self.teacher_spec, self.modality)
            _check_compatible(module.embedder, self.student_reads, self.modality)
            width = int(module.encoder.cfg.dim)
            if width != self.teacher_dim:
                raise ValueError(f"objective distill: the teacher is {width} wide but this head expects "
                                 f"{self.teacher_dim}; set args.teacher_dim: {width} (a learned map then takes the "
                                 f"student's states to that width)")
            self._frozen = _Frozen(module)
        return self._frozen

    # ------------------------------------------------------------------ layout

    def visible_rows(self, batch: PackedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(V,) student stream rows of the visible tokens and (V,) the same tokens' rows in the
        teacher's stream (equal unless the teacher reads every patch of drop-masked images)."""
        inp = batch.inputs[self.modality]
        n = batch.num_tokens
        device = batch.seq.cu_seqlens.device
        if isinstance(inp, TokenInput):
            t = batch.targets.get(self.modality)
            if t is None:
                rows = torch.arange(n, device=device)
            else:  # the hidden positions are distinct stream rows: n - M visible, known on the host
                keep = torch.ones(n, dtype=torch.bool, device=device)
                keep[t.positions] = False
                rows = mask_positions(keep, n - t.count)
            return rows, rows
        if isinstance(inp, FeatureInput):
            if inp.mask is None:
                rows = torch.arange(n, device=device)
            else:
                visible = None if inp.hidden_count is None else inp.mask.numel() - inp.hidden_count
                rows = mask_positions(inp.mask.logical_not().flatten(), visible)
            return rows, rows
        from mmm.modalities.image.embedder import visible_slots

        emb = self.teacher.module.embedder
        mask = inp.mask if inp.mask is not None else torch.zeros(inp.num_images, emb.num_patches, dtype=torch.bool,
                                                                 device=inp.pixels.device)
        visible = None if inp.mask is not None and inp.hidden_count is None else (
            mask.shape[0] * (emb.num_prefix_tokens + mask.shape[1]) - (inp.hidden_count or 0))
        slots = visible_slots(mask, emb.num_prefix_tokens, visible)  # (V,) [CLS] and unmasked patches in the (B*T) layout
        if not inp.drop_masked:
            return slots, slots
        rows = torch.arange(n, device=device)  # the student's stream holds only the visible patches (and [CLS])
        return rows, (rows if self.teacher_input == "masked" else slots)

    # ------------------------------------------------------------------ the teacher

    @torch.no_grad()
    def teacher_states(self, batch: PackedBatch) -> torch.Tensor:
        """(N_teacher, D_teacher) float32 final hidden states of the frozen teacher on this batch."""
        inp = batch.inputs[self.modality]
        device = batch.seq.cu_seqlens.device
        teacher = self.teacher.on(device)
        if teacher.training:
            teacher.eval()
        full = self.teacher_input == "full"
        seq = batch.seq
        if isinstance(inp, TokenInput):
            ids = inp.ids
            t = batch.targets.get(self.modality)
            if full and t is not None:
                ids = ids.index_copy(0, t.positions, t.labels)  # the unmasked ids
            x = teacher.embedder(ids, inp.position_ids)
        elif isinstance(inp, FeatureInput):
            x = teacher.embedder(inp.features.float(), inp.position_ids, None if full else inp.mask)
        else:
            if full:
                x, _ = teacher.embedder(inp.pixels.float())  # every patch
                emb = teacher.embedder
                seq = PackedSeqInfo.from_seqlens([emb.num_prefix_tokens + emb.num_patches] * inp.num_images,
                                                 device=device)
            else:
                x, _ = teacher.embedder(inp.pixels.float(), inp.mask, inp.drop_masked)
        return teacher.encoder(x.float(), seq).float()

    # ------------------------------------------------------------------ the loss

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        names = ("cosine",)
        inp = sole_input(batch, self.modality, "distill")
        if inp is None:
            return zero_output(hidden, self, names)
        rows, teacher_rows = self.visible_rows(batch)
        if rows.numel() == 0:
            return zero_output(hidden, self, names)
        student = hidden.index_select(0, rows)  # (V, d)
        if self.proj is not None:
            student = self.proj(student)
        student = student.float()  # (V, D)
        target = self.teacher_states(batch).index_select(0, teacher_rows)  # (V, D), no gradient
        if self.target_norm == "layer":
            student = F.layer_norm(student, student.shape[-1:])
            target = F.layer_norm(target, target.shape[-1:])
        cos = F.cosine_similarity(student, target, dim=-1)  # (V,)
        if self.loss == "mse":
            loss_sum = F.mse_loss(student, target, reduction="sum") / student.shape[-1]
        else:
            loss_sum = (1.0 - cos).sum()
        count = int(rows.numel())
        return ObjectiveOutput(global_mean(loss_sum, count, in_lockstep(self)), {"cosine": cos.detach().mean()}, count)


GRID = ("num_prefix_tokens", "num_patches", "patch_size")


def _reads(embedder: nn.Module) -> Optional[Tuple[str, Tuple[Any, ...]]]:
    """What an embedder's input must be, as numbers: ``("vocabulary", (ids,))``, ``("grid", (prefix tokens,
    patches, patch size))`` or ``("features", (size,))``; None when none applies."""
    tokens = getattr(embedder, "tokens", None)
    if isinstance(tokens, nn.Embedding):
        return "vocabulary", (tokens.num_embeddings,)
    if hasattr(embedder, "num_patches"):
        return "grid", tuple(getattr(embedder, a) for a in GRID)
    if hasattr(embedder, "feature_dim"):
        return "features", (embedder.feature_dim,)
    return None


def _check_compatible(teacher: nn.Module, student: Optional[Tuple[str, Tuple[Any, ...]]], modality: str) -> None:
    """Refuse a teacher that cannot read the student's batches (vocabulary, patch grid, feature size).

    Args:
        teacher: the teacher's embedder.
        student: what the student's embedder reads (:func:`_reads`).
        modality: named in errors.
    """
    if student is None:
        return
    kind, mine = student
    if kind == "vocabulary":
        theirs = getattr(getattr(teacher, "tokens", None), "num_embeddings", None)
        if theirs != mine[0]:
            raise ValueError(f"objective distill: the {modality!r} teacher has a vocabulary of {theirs} ids but the "
                             f"student {mine[0]}; the teacher must share the student's tokenizer")
    elif kind == "grid":
        theirs = tuple(getattr(teacher, a, None) for a in GRID)
        if mine != theirs:
            raise ValueError(f"objective distill: the image teacher's (prefix tokens, patches, patch size) are "
                             f"{theirs} but the student's {mine}; the tokens must line up (timm_kwargs img_size / "
                             f"class_token can set the teacher's)")
    elif getattr(teacher, "feature_dim", None) != mine[0]:
        raise ValueError(f"objective distill: the {modality!r} teacher reads {getattr(teacher, 'feature_dim', None)}"
                         f"-value tokens but the student {mine[0]}; the front ends must match")
