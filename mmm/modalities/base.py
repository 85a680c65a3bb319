"""What a modality plugs into a run: assets, embedder, masker and data stages.

A modality (text, image, audio, DNA, ...) is one :class:`Modality` subclass registered in
:data:`mmm.registry.MODALITIES`. The run builder (:mod:`mmm.train.pretrain`) asks it, in order, to

1. :meth:`~Modality.prepare` its assets from the training shards (train a tokenizer, fit
   normalisation statistics or k-means codebooks) or reuse those saved in the run folder;
2. :meth:`~Modality.build_embedder` for the shared encoder's width;
3. :meth:`~Modality.build_masker` from the config's masking entry;
4. give the WebDataset :meth:`~Modality.stages` that turn raw shard samples into
   :class:`~mmm.batch.PackedBatch` es.

Assets are small text files (:meth:`~Modality.assets`) embedded in every checkpoint, so a
checkpoint alone rebuilds the model and its input processing.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from mmm.config import ComponentConfig, EncoderConfig, ModelConfig
from mmm.data.epoch import EpochCounter
from mmm.data.tar import ReadOptions

Handler = Callable[[Exception], bool]


class Modality(ABC):
    """Glue between one modality's config section, its data and its embedder.

    Args:
        model_cfg: the run's model configuration (each modality reads its own section).
    """

    name: str = ""

    def __init__(self, model_cfg: ModelConfig) -> None:
        self.model_cfg = model_cfg

    def uses(self) -> Tuple[str, ...]:
        """The embedders this modality's batches feed: its own name for a base modality; a composite
        modality (``image_text``) names the base modalities whose embedders read its batches."""
        return (self.name,)

    def bind(self, parts: Dict[str, "Modality"]) -> None:
        """Receive the run's base modalities (name → instance) named by :meth:`uses`.

        Called by the run builder before :meth:`prepare`; a composite modality keeps them to use
        their tokenizer, settings and maskers. Base modalities need nothing.
        """

    def reject_options(self, options: Optional[Dict[str, Any]]) -> None:
        """Raise when a task passes stream options to a modality that takes none."""
        if options:
            raise ValueError(f"modality {self.name!r} takes no task options, got {sorted(options)}")

    def prepare(self, train_urls: List[str], run_dir: Path, options: Optional[ReadOptions] = None) -> None:
        """Make the assets ready: load them from the run folder, or fit them on ``train_urls`` and save.

        ``options`` say how the shards are read (the run's ``data.max_member_bytes``,
        ``data.read_timeout_s``, ``data.skip_bad``: :meth:`mmm.data.tar.ReadOptions.from_config`),
        so fitting reads them exactly as training does; None: the defaults.
        """

    def assets(self) -> Dict[str, str]:
        """File name → text of every asset (embedded in checkpoints)."""
        return {}

    def load_assets(self, files: Dict[str, str], where: str) -> None:
        """Restore assets from :meth:`assets` output (``where`` names the source in errors)."""
        if files:
            raise ValueError(f"{where}: modality {self.name!r} has no assets but the checkpoint holds {sorted(files)}")

    @abstractmethod
    def build_embedder(self, encoder_cfg: EncoderConfig) -> nn.Module:
        """The embedder producing (N_m, d) tokens for the shared encoder."""

    @abstractmethod
    def build_masker(self, masking: ComponentConfig) -> Any:
        """The masker named by ``masking`` (validated for this modality)."""

    @abstractmethod
    def stages(self, masker: Any, *, batch_size: int, seed: int, handler: Handler, fixed_masking: bool,
               epochs: Optional[EpochCounter], train: bool, options: Optional[Dict[str, Any]] = None) -> List:
        """WebDataset stages from raw shard samples to :class:`~mmm.batch.PackedBatch` es.

        Args:
            masker: from :meth:`build_masker`.
            batch_size: samples per batch.
            seed: seed of every random choice in the stages (masks, augmentation).
            handler: bad-sample handler (counts; skips or raises).
            fixed_masking: draw the same masks on every pass (validation).
            epochs: the pipeline's epoch counter (random choices are keyed by its epoch).
            train: training stream (augmentation on) or evaluation stream.
            options: the task's ``options`` (:class:`~mmm.config.TaskConfig`); a modality that
                takes none calls :meth:`reject_options`.
        """

    def settings(self) -> Dict[str, Any]:
        """Settings the training stream depends on (compared on resume)."""
        return {}
