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

A modality also declares, as class attributes, its config section (``config_class``: the
dataclass read from ``model.<name>``, so :class:`~mmm.config.ModelConfig` holds it without naming
it) and, as class methods, its standalone encoder: how :func:`mmm.load_encoder` builds it from a
checkpoint, saves it to a folder and reads it back (:meth:`~Modality.encoder_from_checkpoint`,
:meth:`~Modality.encoder_meta`, :meth:`~Modality.save_encoder_files`,
:meth:`~Modality.load_saved_encoder`, :meth:`~Modality.load_foreign_encoder`), and how its raw inputs are
read and pooled downstream (:meth:`~Modality.downstream_inputs`: ``mmm embed``, ``mmm finetune``, probes)
and which labelled tasks it offers there (:meth:`~Modality.downstream_tasks`: ``mmm finetune --task``,
``mmm bench --suite downstream``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from mmm.config import ComponentConfig, EncoderConfig, ModelConfig, ObjectiveConfig
from mmm.data.epoch import EpochCounter
from mmm.data.tar import ReadOptions
from mmm.registry import MASKERS

if TYPE_CHECKING:
    from mmm.downstream.tasks import DownstreamTask

Handler = Callable[[Exception], bool]


def masker_kind(name: str) -> Optional[str]:
    """The input kind registered masker ``name`` masks (its class's ``masks``), or None (unknown name
    or no declaration)."""
    return getattr(MASKERS.get(name), "masks", None) if name in MASKERS else None


def maskers_for(*kinds: str) -> List[str]:
    """The registered maskers that mask one of ``kinds``, sorted."""
    return [n for n in MASKERS.list() if masker_kind(n) in kinds]


class Modality(ABC):
    """Glue between one modality's config section, its data and its embedder.

    Args:
        model_cfg: the run's model configuration (each modality reads its own section).
    """

    name: str = ""
    order: int = 100
    """Place among the modalities in config sections and listings (the built-in ones use 10..60)."""
    config_class: Optional[type] = None
    """The dataclass of this modality's ``model.<name>`` section, or None when it has none."""
    config_help: str = ""
    """The section's one-line help (a comment in ``--print_config``)."""
    masks: Tuple[str, ...] = ()
    """The input kinds this modality's maskers may mask, matched against each masker class's own
    ``masks`` declaration (``token``, ``dna``, ``patch``, ``region``, ``audio``, ...); empty: any masker."""
    masks_what: str = ""
    """How errors name what this modality's maskers hide (e.g. "image patches")."""
    masker_hint: str = ""
    """Appended to the error that refuses a masker (which one to pick when)."""
    asset_settings: Tuple[str, ...] = ()
    """Fields of this modality's ``model.<name>`` section that shape its fitted assets (tokenizer, statistics,
    codebooks). A resumed run restores the assets from its checkpoint, so a change to one of these cannot take
    effect: the resume is refused, naming it (:func:`mmm.train.pretrain.check_checkpoint_fits`)."""

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

    def check_objectives(self, objectives: Sequence[ObjectiveConfig]) -> None:
        """Refuse, by name, an objective that this modality's settings can never feed (called when the
        run's model is built, before any data is read); default: every objective is accepted."""

    def token_targets(self) -> Dict[str, int]:
        """The ``batch.targets`` keys of discrete ids (codebook classes) this modality's batches can carry, with
        their number of classes, so a ``token_targets`` / ``mvm`` head is checked against them before any data is
        read (:func:`mmm.objectives.target_check.check_token_targets`); default: none."""
        return {}

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

    def check_masker(self, name: str) -> None:
        """Refuse masker ``name`` unless it masks an input kind of :attr:`masks` (its class's
        ``masks`` declaration); the error lists the maskers that fit. An unknown name is the
        registry's error (it lists every masker)."""
        MASKERS.get(name)
        if self.masks and masker_kind(name) not in self.masks:
            raise ValueError(f"masking.name {name!r} does not mask {self.masks_what or self.name + ' inputs'}; "
                             f"use one of {tuple(maskers_for(*self.masks))}{self.masker_hint}")

    def create_masker(self, masking: ComponentConfig, **kwargs: Any) -> Any:
        """Build the masker ``masking`` names (with ``kwargs`` added to its args), checked by :meth:`check_masker`."""
        self.check_masker(masking.name)
        return MASKERS.create(masking.name, **kwargs, **masking.args)

    # ------------------------------------------------------------------ standalone encoder

    @classmethod
    def encoder_from_checkpoint(cls, contents: Any) -> nn.Module:
        """This modality's standalone encoder (embedder + shared encoder, eval mode) of a read
        checkpoint (:class:`~mmm.checkpoint.CheckpointContents`); a modality without one raises."""
        raise ValueError(f"modality {cls.name!r} has no standalone encoder")

    @classmethod
    def encoder_meta(cls, encoder: nn.Module) -> Dict[str, Any]:
        """Entries of ``mmm_encoder.json`` beyond ``format``, ``modality`` and ``model`` (the
        encoder's ``config``); raises when the encoder cannot be saved as it is."""
        return {}

    @classmethod
    def save_encoder_files(cls, encoder: nn.Module, directory: Path) -> None:
        """Write what the encoder needs besides its weights into ``directory`` (a tokenizer, a front end)."""

    @classmethod
    def load_saved_encoder(cls, directory: Path, meta: Dict[str, Any]) -> nn.Module:
        """The encoder of a :func:`~mmm.encoders.save_encoder` folder whose ``mmm_encoder.json`` is
        ``meta`` (format and modality already checked; eval mode)."""
        raise ValueError(f"{directory}: modality {cls.name!r} has no standalone encoder to load")

    @classmethod
    def load_foreign_encoder(cls, source: Path, **options: Any) -> Optional[nn.Module]:
        """An encoder from a source mmm did not write (e.g. an HF or timm file), or None when
        ``source`` is none this modality reads. ``options`` are the caller's source options."""
        if options:
            raise ValueError(f"load_encoder: modality {cls.name!r} takes no options, got {sorted(options)}")
        return None

    @classmethod
    def downstream_inputs(cls) -> Optional[type]:
        """The :class:`~mmm.downstream.inputs.InputAdapter` subclass that reads this modality's raw inputs (shard
        samples, files, table cells) and pools its standalone encoder's outputs, so ``mmm embed``,
        ``mmm finetune`` and the probes serve it; None (the default): the modality has no downstream inputs."""
        return None

    @classmethod
    def downstream_tasks(cls) -> Dict[str, DownstreamTask]:
        """This modality's labelled downstream tasks, built locally, ``{name: DownstreamTask}``
        (:mod:`mmm.downstream.tasks`; each task's ``modality`` is this one's name, its names unique among all
        modalities), so ``mmm finetune --task NAME`` and ``mmm bench --suite downstream`` run them; a task reads
        its inputs through :meth:`downstream_inputs`. Empty (the default): the modality offers none."""
        return {}
