"""Masked region modeling, the three variants of UNITER (Chen et al. 2020, "UNITER: UNiversal
Image-TExt Representation Learning", Sec. 3.1), each scored only at hidden image tokens.

* ``mrfr`` (masked region feature regression): a transform (dense → GELU → LayerNorm) and a
  linear map regress each hidden region's original input feature; mean squared error.
* ``mrc`` (masked region classification): a classifier over the detector's C classes,
  cross-entropy against the hard pseudo-label ``argmax`` of the region's soft labels.
* ``mrc_kl`` (MRC with KL divergence): ``KL(soft_labels ‖ softmax(prediction))``, distilling the
  whole distribution instead of its argmax (UNITER's best MRM variant).

All three read :class:`~mmm.batch.RegionTargets` (key ``"mrm"`` by default) and gather the
hidden states at its ``positions`` before the head, so only the M hidden tokens are projected.
Targets come from the shards (``features`` / ``soft_labels``, a detector's outputs) or, for
patch inputs (``pixel_index`` set, those None), from a frozen teacher image encoder
(:mod:`mmm.targets.teacher`) run on the batch's pixels; the teacher is held outside the module
tree, so it is not trained and not saved.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import ImageInput, PackedBatch, RegionTargets
from mmm.config import EncoderConfig
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, zero_output
from mmm.registry import OBJECTIVES

if TYPE_CHECKING:
    from mmm.targets.teacher import FrozenTeacher


class RegionHead(nn.Module):
    """UNITER's region prediction head: dense → GELU → LayerNorm → linear.

    Args:
        dim: encoder width.
        out_dim: output size (feature size F for MRFR, class count C for MRC).
        norm_eps: LayerNorm epsilon.
        tied: a ``Linear(out_dim, dim)`` (an embedder's input projection) whose transposed weight is the output
            layer's (UNITER's MRFR), with a bias of the head's own; None: the head's own ``Linear(dim, out_dim)``.
    """

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-12, tied: Optional[nn.Linear] = None) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        if tied is None:
            self.out = nn.Linear(dim, out_dim)
        else:
            self.out_bias = nn.Parameter(torch.zeros(out_dim))
        self._tied = (tied,)  # a tuple: the embedder's layer stays the embedder's (not a submodule, saved once)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, d) → (M, out_dim)."""
        x = self.norm(F.gelu(self.dense(hidden)))
        tied = self._tied[0]
        return self.out(x) if tied is None else F.linear(x, tied.weight.t(), self.out_bias)


def tied_projection(embedders: Mapping[str, nn.Module], name: Optional[str], feature_dim: int,
                    dim: int) -> Optional[nn.Linear]:
    """The ``feature_proj`` (``Linear(feature_dim, dim)``) of embedder ``name`` for MRFR's ``tie_to``; None for None."""
    if name is None:
        return None
    if name not in embedders:
        raise ValueError(f"objective mrfr: tie_to={name!r} names no embedder of the model (embedders: "
                         f"{sorted(embedders)})")
    proj = getattr(embedders[name], "feature_proj", None)
    if not isinstance(proj, nn.Linear):
        raise ValueError(f"objective mrfr: tie_to={name!r}: that embedder has no feature_proj input projection "
                         "to tie to (the regions embedder has one)")
    if tuple(proj.weight.shape) != (dim, feature_dim):
        raise ValueError(f"objective mrfr: tie_to={name!r}: its feature_proj maps {proj.weight.shape[1]} → "
                         f"{proj.weight.shape[0]}, the head regresses feature_dim={feature_dim} from width {dim}")
    return proj


class RegionTargetSource:
    """Where an MRM objective's targets come from: the batch's :class:`RegionTargets`, or a teacher.

    A plain object (not an ``nn.Module``), so the teacher it holds stays out of the objective's
    parameters and ``state_dict``.

    Args:
        objective: the objective's name (for messages).
        embedders: the model's embedders (the image one gives the patch grid for a teacher).
        modality: the image modality whose pixels a teacher reads.
        target: key of the :class:`RegionTargets` in ``batch.targets``.
        teacher: a teacher spec (see :func:`mmm.targets.teacher.build_teacher`) or None.
    """

    def __init__(self, objective: str, embedders: Mapping[str, nn.Module], modality: str, target: str,
                 teacher: Optional[Mapping[str, Any]]) -> None:
        self.objective, self.modality, self.target = objective, modality, target
        self.teacher: Optional["FrozenTeacher"] = None
        if teacher is not None:
            emb = embedders.get(modality)
            grid = getattr(emb, "grid", None)
            if grid is None:
                raise ValueError(f"objective {objective}: a teacher computes targets per image patch, but there is no "
                                 f"patch image embedder named {modality!r} (modalities: {sorted(embedders)})")
            from mmm.targets.teacher import build_teacher  # imported on use: it pulls in torchvision

            self.teacher = build_teacher(teacher, grid)

    def resolve_dim(self, arg: str, given: Optional[int], from_teacher: Optional[int]) -> int:
        """The head's output size: ``given`` (config), else the teacher's; both must agree when both are set."""
        if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
            raise ValueError(f"objective {self.objective}: {arg} must be a positive int, got {given!r}")
        if given is not None and from_teacher is not None and given != from_teacher:
            raise ValueError(f"objective {self.objective}: {arg}={given} but the teacher gives {from_teacher}; "
                             f"drop {arg} or make them agree")
        value = given if given is not None else from_teacher
        if value is None:
            raise ValueError(f"objective {self.objective}: set {arg} (the size of the shards' targets) or give a teacher")
        return int(value)

    def get(self, batch: PackedBatch) -> Optional[RegionTargets]:
        """The batch's region targets, or None when it has none (or zero hidden tokens)."""
        t = batch.targets.get(self.target)
        if t is None or t.count == 0:
            return None
        if not isinstance(t, RegionTargets):
            raise TypeError(f"objective {self.objective}: batch.targets[{self.target!r}] is a {type(t).__name__}, "
                            f"expected RegionTargets")
        return t

    def _teacher_targets(self, t: RegionTargets, batch: PackedBatch, what: str):
        if t.pixel_index is None:
            raise ValueError(f"objective {self.objective}: batch.targets[{self.target!r}].{what} is None and there is "
                             f"no pixel_index for a teacher to compute it from")
        if self.teacher is None:
            raise ValueError(f"objective {self.objective}: the batch carries no {what} (only pixel_index); configure a "
                             f"teacher in the objective args to compute them")
        inp = batch.inputs.get(self.modality)
        if not isinstance(inp, ImageInput):
            raise ValueError(f"objective {self.objective}: teacher targets need an image input named "
                             f"{self.modality!r}; the batch has {sorted(batch.inputs)}")
        image, patch = t.pixel_index.unbind(-1)  # (M,), (M,)
        if t.teacher_images is not None:  # found on the host when the targets were built: no device read
            used, inverse, (low, high) = t.teacher_images, t.teacher_slot, t.patch_range
        else:  # targets built on the device
            used, inverse = torch.unique(image, return_inverse=True)
            low, high = int(patch.min()), int(patch.max())
        out = self.teacher(inp.pixels.index_select(0, used))  # run only on images with hidden patches: (U, P, F) [, (U, P, C)]
        p = out.features.shape[1]
        if high >= p or low < 0:
            raise ValueError(f"objective {self.objective}: pixel_index names patches {low}..{high}, but the grid "
                             f"has {p} patches")
        return out, inverse, patch

    def _given_or_taught(self, t: RegionTargets, batch: PackedBatch, field: str, size: int, what: str,
                         head: str) -> torch.Tensor:
        """(M, size) float32 targets: the batch's ``field`` when the shards carry it, else the teacher's at the
        hidden regions/patches; an error naming both shapes when the width is not the head's ``size``."""
        target = getattr(t, field)
        if target is None:
            out, img, patch = self._teacher_targets(t, batch, field)
            target = getattr(out, field)[img, patch]  # (M, size)
        if target.dim() != 2 or target.shape[-1] != size:
            raise ValueError(f"objective {self.objective}: the batch's {what} have shape {tuple(target.shape)}, "
                             f"but the {head}")
        return target.float()

    def features(self, t: RegionTargets, batch: PackedBatch, dim: int) -> torch.Tensor:
        """(M, F) float32 regression targets."""
        return self._given_or_taught(t, batch, "features", dim, "target features", f"head regresses feature_dim={dim}")

    def soft_labels(self, t: RegionTargets, batch: PackedBatch, classes: int) -> torch.Tensor:
        """(M, C) float32 class distributions."""
        return self._given_or_taught(t, batch, "soft_labels", classes, "soft labels",
                                     f"classifier predicts num_classes={classes}")


@OBJECTIVES.register("mrfr")
class MaskedRegionFeatureRegression(nn.Module):
    """UNITER's MRFR: regress each hidden region's (or patch's teacher) feature, MSE; logs cosine similarity.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder).
        encoder_cfg: the shared encoder's config (given by the builder; its LayerNorm epsilon is used).
        feature_dim: size F of the target features (the shards' region features); None = the teacher's.
        teacher: frozen teacher spec ``{kind, model, path, kwargs}`` for patch targets; None = targets from the shards.
        modality: the image modality a teacher reads pixels from.
        target: key of the region targets in ``batch.targets``.
        tie_to: the embedder (e.g. ``regions``) whose input projection ``feature_proj`` (F → d), transposed, is the
            head's output layer, as UNITER's released code ties its MRFR output to the region embedder's
            ``img_linear``; None: the head's own output layer.
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 feature_dim: Optional[int] = None, teacher: Optional[Dict[str, Any]] = None,
                 modality: str = "image", target: str = "mrm", tie_to: Optional[str] = None) -> None:
        super().__init__()
        self.source = RegionTargetSource("mrfr", embedders, modality, target, teacher)
        t = self.source.teacher
        self.feature_dim = self.source.resolve_dim("feature_dim", feature_dim, t.feature_dim if t else None)
        self.head = RegionHead(dim, self.feature_dim, encoder_cfg.norm_eps, tied_projection(embedders, tie_to,
                                                                                            self.feature_dim, dim))

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → MSE on the hidden regions' features."""
        t = self.source.get(batch)
        if t is None:
            return zero_output(hidden, self, ("cos",))
        target = self.source.features(t, batch, self.feature_dim)  # (M, F)
        pred = self.head(hidden.index_select(0, t.positions)).float()  # (M, F)
        # per-region mean squared error, summed; / global region count: exact under DDP (the plain mean on one rank)
        loss = global_mean(F.mse_loss(pred, target, reduction="sum") / self.feature_dim, t.count, in_lockstep(self))
        cos = F.cosine_similarity(pred.detach(), target, dim=-1).mean()
        return ObjectiveOutput(loss, {"cos": cos}, t.count)


class RegionClassifier(nn.Module):
    """The part ``mrc`` and ``mrc_kl`` share: targets (the shards' soft labels or a classifier
    teacher's), the class count resolved against both, and a :class:`RegionHead` over the hidden
    image tokens; each variant supplies only its loss, :meth:`score`.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder).
        encoder_cfg: the shared encoder's config (given by the builder; its LayerNorm epsilon is used).
        num_classes: number of classes C of the soft labels (the detector's); None = the teacher's.
        teacher: frozen classifier teacher spec ``{kind, model, path, kwargs}``; None = soft labels from the shards.
        modality: the image modality a teacher reads pixels from.
        target: key of the region targets in ``batch.targets``.
    """

    objective = ""  # the registry name, set by each variant (for messages)
    metrics: Tuple[str, ...] = ()  # what :meth:`score` logs besides the loss

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 num_classes: Optional[int] = None, teacher: Optional[Dict[str, Any]] = None,
                 modality: str = "image", target: str = "mrm") -> None:
        super().__init__()
        name = self.objective
        self.source = RegionTargetSource(name, embedders, modality, target, teacher)
        t = self.source.teacher
        if t is not None and not t.has_classifier:
            raise ValueError(f"objective {name}: the teacher {teacher.get('model')!r} ({teacher.get('kind')}) has no "
                             f"classifier head, so it gives no soft labels; use a classifier teacher (a timm model "
                             f"with num_classes > 0) or mrfr")
        self.num_classes = self.source.resolve_dim("num_classes", num_classes, t.num_classes if t else None)
        self.head = RegionHead(dim, self.num_classes, encoder_cfg.norm_eps)

    def score(self, logits: torch.Tensor, soft: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(loss summed over the M regions, metrics)`` from (M, C) float32 logits and soft labels."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → the variant's loss on the hidden regions, averaged over them."""
        t = self.source.get(batch)
        if t is None:
            return zero_output(hidden, self, self.metrics)
        soft = self.source.soft_labels(t, batch, self.num_classes)  # (M, C)
        logits = self.head(hidden.index_select(0, t.positions)).float()  # (M, C)
        loss_sum, metrics = self.score(logits, soft)
        # summed over regions / global region count: exact under DDP (the plain mean on one rank)
        return ObjectiveOutput(global_mean(loss_sum, t.count, in_lockstep(self)), metrics, t.count)


@OBJECTIVES.register("mrc")
class MaskedRegionClassification(RegionClassifier):
    """UNITER's MRC: classify each hidden region, cross-entropy against ``argmax(soft_labels)``; logs
    accuracy. Arguments as :class:`RegionClassifier`, and

    Args:
        background: a class index the hard pseudo-label never takes, or None (every class). UNITER's released
            code takes the argmax over the detector's object classes only, skipping its background class 0
            (``max(soft[:, 1:]) + 1``); set ``background: 0`` for such soft labels.
    """

    objective = "mrc"
    metrics = ("acc",)

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 num_classes: Optional[int] = None, teacher: Optional[Dict[str, Any]] = None,
                 modality: str = "image", target: str = "mrm", background: Optional[int] = None) -> None:
        super().__init__(dim, embedders, encoder_cfg, num_classes, teacher, modality, target)
        if background is not None and (isinstance(background, bool) or not isinstance(background, int)
                                       or not 0 <= background < self.num_classes):
            raise ValueError(f"objective mrc: background must be a class index in [0, {self.num_classes}) or null, "
                             f"got {background!r}")
        if background is not None and self.num_classes < 2:
            raise ValueError("objective mrc: background leaves no class to predict with num_classes=1")
        self.background = background

    def score(self, logits: torch.Tensor, soft: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.background is not None:  # the argmax over the other classes (UNITER: the object classes)
            soft = soft.index_fill(-1, torch.tensor([self.background], device=soft.device), -1.0)
        labels = soft.argmax(-1)  # (M,) hard pseudo-labels
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return F.cross_entropy(logits, labels, reduction="sum"), {"acc": acc}


@OBJECTIVES.register("mrc_kl")
class MaskedRegionClassificationKL(RegionClassifier):
    """UNITER's MRC-kl: ``KL(soft_labels ‖ softmax(prediction))`` averaged over hidden regions.
    Arguments as :class:`RegionClassifier`."""

    objective = "mrc_kl"

    def score(self, logits: torch.Tensor, soft: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return F.kl_div(logits.log_softmax(-1), soft, reduction="sum"), {}  # Σ p (log p − log q) over the regions
