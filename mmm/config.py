"""Typed configuration: one dataclass per concern, YAML in, resolved config out.

Every field carries a one-line ``help`` (printed as a comment by ``--print_config``). Loading is
strict: an unknown key, a wrong type or a bad override names the file and the dotted key and
lists what would have been valid. Precedence is flat: dataclass defaults < YAML file <
command-line overrides (``--trainer.max_steps 50``). There are no include chains.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

from mmm.errors import UserError
from mmm.registry import MODALITIES

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the typed schema."""


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _f(default: Any = dataclasses.MISSING, help: str = "", default_factory: Any = dataclasses.MISSING, *,
       ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
       lt: Optional[float] = None, choices: Union[Tuple[Any, ...], Callable[[], Sequence[Any]], None] = None) -> Any:
    """A config field with its help text, the range a number (or each number of a tuple) must lie in, and
    the values a string may take (``choices``: a tuple, or a function returning them, read when checked so
    that the list can live beside the code that honours it: a registry, a module's constant)."""
    meta: Dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["bounds"] = bounds
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _constant(module: str, name: str) -> Callable[[], Sequence[Any]]:
    """The choices a module's constant lists (imported when a config is checked: no import cycle)."""
    return lambda: getattr(importlib.import_module(module), name)


def _registered(registry: str, *extra: str) -> Callable[[], Sequence[Any]]:
    """The names registered in ``mmm.registry.<registry>`` (plus ``extra`` values such as ``auto``)."""
    return lambda: (*extra, *getattr(importlib.import_module("mmm.registry"), registry).list())


def _lightning_precisions() -> Sequence[Any]:
    """The precision strings Lightning's Trainer accepts (empty, i.e. not checked here, if a Lightning
    version moves its private lists: the Trainer then refuses a bad value itself)."""
    try:
        from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    except ImportError:
        return ()
    return (*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS))


@dataclass
class EncoderConfig:
    """The shared Transformer encoder (one for every modality)."""

    dim: int = _f(256, "hidden size d", ge=1)
    depth: int = _f(4, "number of Transformer blocks", ge=1)
    heads: int = _f(4, "attention heads; dim must be divisible by heads", ge=1)
    mlp_hidden: Optional[int] = _f(None, "MLP hidden size; null = 4 * dim", ge=1)
    mlp: str = _f("gelu", "MLP kind: gelu (BERT/ViT), glu, geglu (MosaicBERT), swiglu",
                  choices=_constant("mmm.core.encoder", "MLP_KINDS"))
    norm_first: bool = _f(False, "pre-LayerNorm (ViT) if true, post-LayerNorm (BERT) if false")
    final_norm: bool = _f(False, "LayerNorm after the last block (pre-LN models usually want it)")
    norm_eps: float = _f(1e-12, "LayerNorm epsilon (BERT 1e-12, ViT 1e-6)", gt=0)
    qkv_bias: bool = _f(True, "bias on the query/key/value projections")
    dropout: float = _f(0.1, "dropout on residual branches", ge=0, lt=1)
    attn_dropout: float = _f(0.1, "dropout on attention probabilities", ge=0, lt=1)
    relative_position: str = _f("none", "relative positions inside attention: none, alibi, rotary",
                                choices=_constant("mmm.core.position", "RELATIVE_POSITIONS"))
    attention: str = _f("auto", "attention backend: auto, xformers, sdpa, math (env MMM_ATTENTION overrides auto)",
                        choices=_registered("ATTENTION_BACKENDS", "auto"))
    experts: bool = _f(False, "modality experts (VLMo / ONE-PEACE): shared attention, one MLP per modality of the model "
                       "chosen by each token's modality; load_encoder(ckpt, modality=m) folds expert m into the plain MLP")
    mto_layers: int = _f(0, "masked token optimisation (MTO, Choi et al. 2024): in the first N blocks, tokens holding a "
                         "mask embedding (mask-token image patches, audio frames, hidden regions) are left out of "
                         "the other tokens' attention keys; 0 = off", ge=0)
    final_layer_subset: bool = _f(False, "MosaicBERT's final-layer subset: when every head of a pass names the rows "
                                  "it reads (MLM: the masked positions), the last block runs for those rows alone "
                                  "(the same loss and gradients, less compute); other passes run it in full")


@dataclass
class TextConfig:
    """The text modality: tokenizer and embedder."""

    tokenizer: str = _f("wordpiece", "tokenizer algorithm to train when tokenizer_path is null: wordpiece, bpe",
                        choices=("wordpiece", "bpe"))
    tokenizer_path: Optional[str] = _f(None, "directory of a saved mmm tokenizer; null = train one on the training shards")
    vocab_size: int = _f(8000, "vocabulary size when training a tokenizer", ge=1)
    lowercase: bool = _f(True, "lowercase text when training a tokenizer")
    tokenizer_train_docs: int = _f(20000, "documents read from the training shards to train the tokenizer", ge=1)
    max_len: int = _f(128, "longest sequence in tokens ([CLS] and [SEP] included); longer text is chunked, not dropped", ge=3)
    position: str = _f("learned", "absolute positions added to token embeddings: learned, sinusoidal, none",
                       choices=_constant("mmm.core.position", "ABSOLUTE_POSITIONS"))
    embed_norm: bool = _f(True, "LayerNorm after the embedding sum (BERT)")
    segments: int = _f(0, "segment (token type) embeddings, BERT: a token's segment is the number of [SEP] before it "
                       "in its sequence, capped at segments-1 (a pair's second text is segment 1); 0 = none (RoBERTa)",
                       ge=0)


@dataclass
class ImageConfig:
    """The image modality: patch embedder, encoder mode, input pipeline."""

    image_size: int = _f(32, "input height and width in pixels (the pipeline crops/resizes to it)", ge=1)
    patch_size: int = _f(4, "side of a square patch in pixels; must divide image_size", ge=1)
    cls_token: bool = _f(True, "prepend a learned [CLS] token to every image")
    position: str = _f("sincos", "patch positions: sincos (fixed 2-D, MAE), learned, or none (no position in the input: MP3 position prediction)",
                       choices=_constant("mmm.modalities.image.embedder", "IMAGE_POSITIONS"))
    embed_norm: bool = _f(False, "LayerNorm on the patch tokens before the encoder (off for ViT/MAE)")
    drop_masked: bool = _f(True, "MAE mode: hidden patches never enter the encoder; false = SimMIM/BEiT mask-token mode")
    crop_scale: Tuple[float, float] = _f((0.2, 1.0), "random-resized-crop area range for training (MAE)", gt=0, le=1)
    hflip: float = _f(0.5, "horizontal flip probability for training", ge=0, le=1)
    max_pixels: int = _f(64 * 1024 * 1024, "refuse images whose header claims more pixels (decompression-bomb guard; "
                         "at most PIL's own hard limit, 2 x Image.MAX_IMAGE_PIXELS = 178956970)", ge=1, le=178_956_970)
    min_size: int = _f(8, "smallest accepted image side in pixels", ge=1)
    small_images: str = _f("upscale", "images smaller than min_size: upscale or reject (counted as bad samples)",
                           choices=("upscale", "reject"))
    visual_tokens: int = _f(0, "size of a k-means visual-token codebook over patch pixels (BEiT-style targets); 0 = none", ge=0)
    codebook_images: int = _f(2000, "training images sampled to fit the visual-token codebook", ge=1)


@dataclass
class DNAConfig:
    """The DNA modality: nucleotide tokenizer and embedder."""

    tokenizer: str = _f("dna_kmer", "dna_char (single nucleotide), dna_kmer (DNABERT / Nucleotide Transformer), dna_bpe (DNABERT-2)",
                        choices=("dna_char", "dna_kmer", "dna_bpe"))
    k: int = _f(6, "k-mer length for dna_kmer", ge=1)
    overlapping: bool = _f(True, "dna_kmer: overlapping k-mers, stride 1 (DNABERT); false = stride k (Nucleotide Transformer)")
    tokenizer_path: Optional[str] = _f(None, "directory of a saved mmm DNA tokenizer; null = build (k-mer, char) or train (BPE) one")
    vocab_size: int = _f(4096, "BPE vocabulary size when training dna_bpe", ge=1)
    tokenizer_train_docs: int = _f(2000, "sequences read from the training shards to train dna_bpe", ge=1)
    max_len: int = _f(512, "longest sequence in tokens ([CLS]/[SEP] included); longer windows are cut into several, none dropped", ge=3)
    position: str = _f("learned", "absolute positions added to token embeddings: learned, sinusoidal, none",
                       choices=_constant("mmm.core.position", "ABSOLUTE_POSITIONS"))
    embed_norm: bool = _f(True, "LayerNorm after the embedding sum")
    reverse_complement: float = _f(0.5, "probability of reverse-complementing a training sequence (augmentation)", ge=0, le=1)


@dataclass
class AudioConfig:
    """The audio modality: log-mel front end, feature-token embedder, discrete targets."""

    sample_rate: int = _f(16000, "target sample rate; clips are resampled and mixed to mono", ge=1)
    n_mels: int = _f(64, "log-mel bins", ge=1)
    win_ms: float = _f(25.0, "STFT window in milliseconds", gt=0)
    hop_ms: float = _f(10.0, "STFT hop in milliseconds", gt=0)
    token: str = _f("time", "token kind: time (frames_per_token stacked frames) or patch (2-D spectrogram patches, AudioMAE)",
                    choices=_constant("mmm.modalities.audio.frontend", "_TOKEN_KINDS"))
    frames_per_token: int = _f(4, "frames per time token", ge=1)
    patch_freq: int = _f(16, "patch height in mel bins (token: patch)", ge=1)
    patch_time: int = _f(4, "patch width in frames (token: patch)", ge=1)
    max_seconds: float = _f(10.0, "longest clip fed to the model; longer clips are cut into several sequences", gt=0)
    norm: str = _f("bin", "normalisation statistics: bin (per mel bin) or global (AudioMAE)",
                   choices=_constant("mmm.modalities.audio.frontend", "_NORM_KINDS"))
    stats_clips: int = _f(500, "training clips used to fit the normalisation statistics", ge=1)
    targets: List[str] = _f(default_factory=lambda: ["mfcc"], help="discrete target sets (k-means over these features: mfcc, logmel, chroma), one head each (HuBERT; MERT uses acoustic + musical)")
    target_clusters: int = _f(64, "k-means clusters per target set", ge=1)
    target_clips: int = _f(300, "training clips used to fit the k-means codebooks", ge=1)
    position: str = _f("learned", "absolute positions added to token embeddings: learned, sinusoidal, none",
                       choices=_constant("mmm.core.position", "ABSOLUTE_POSITIONS"))
    max_tokens: int = _f(512, "size of the position table (tokens per sequence)", ge=1)
    embed_norm: bool = _f(True, "LayerNorm on the embedded feature tokens (wav2vec 2.0 / HuBERT normalise the encoder input)")


@dataclass
class RegionConfig:
    """Precomputed image-region features (UNITER-style detector outputs stored in the shards)."""

    feature_dim: int = _f(2048, "size of one region feature vector (2048 for UNITER's Faster R-CNN features)", ge=1)
    box_dim: int = _f(7, "size of the box geometry vector (UNITER: x1, y1, x2, y2, w, h, w*h, normalised)", ge=1)
    max_regions: int = _f(100, "most regions per image kept (the first ones; more is an error unless truncated)", ge=1)
    position: str = _f("none", "positions added to region tokens: none (the box geometry places them), learned",
                       choices=_constant("mmm.modalities.image_text.regions", "REGION_POSITIONS"))


@dataclass
class ImageTextConfig:
    """Image-text pairs in one joint sequence (UNITER single stream): text tokens, then image tokens."""

    image_input: str = _f("patches", "what stands for the image: patches (the image modality's patch embedder) or regions (precomputed region features)",
                          choices=_constant("mmm.modalities.image_text.pipeline", "IMAGE_INPUTS"))
    max_text_len: int = _f(40, "longest caption in tokens ([CLS]/[SEP] included); longer captions are cut (counted)", ge=3)
    itm_negatives: float = _f(0.5, "ITM: fraction of pairs whose caption is replaced by another sample's caption", ge=0, le=1)
    layout: str = _f("single", "single: one joint sequence per pair (UNITER); two_stream: caption and image as separate sequences fused by cross-modality layers (LXMERT)",
                     choices=("single", "two_stream"))
    cross_layers: int = _f(5, "two_stream: number of cross-modality layers after the shared encoder (LXMERT: 5)", ge=0)


def model_sections() -> List[dataclasses.Field]:
    """One field per registered modality that declares a config section (``config_class``), in the
    modalities' ``order``: the ``model.<name>`` keys besides the fixed ones of :class:`ModelConfig`.

    The modalities register themselves (:data:`mmm.registry.MODALITIES`, filled on first lookup),
    so a new modality's section needs no edit here.
    """
    found = []
    for name in MODALITIES.list():
        entry = MODALITIES.get(name)
        cls = getattr(entry, "config_class", None)
        if cls is not None:
            found.append((getattr(entry, "order", 100), name, cls, getattr(entry, "config_help", "")))
    out = []
    for _, name, cls, help_text in sorted(found, key=lambda t: (t[0], t[1])):
        f = field(default_factory=cls, metadata={"help": help_text or f"{name} modality"})
        f.name, f.type = name, cls
        out.append(f)
    return out


@dataclass(init=False, eq=False, repr=False)
class ModelConfig:
    """Everything that defines the network: the shared encoder, one section per registered modality
    (``model.text``, ``model.image``, ... -- each modality registers its section's dataclass, see
    :func:`model_sections`; read as attributes, ``cfg.text``) and the initialisation.

    Args:
        encoder: the shared encoder.
        init_std: see the field.
        init_from: see the field.
        sections: name → section (e.g. from :func:`dataclasses.replace`); sections not given take
            their defaults.
        named: sections by name (``text=TextConfig(...)``), as for a plain dataclass.
    """

    encoder: EncoderConfig = _f(default_factory=EncoderConfig, help="shared encoder")
    init_std: float = _f(0.02, "std of the normal initialisation of linear and embedding weights", gt=0)
    init_from: Optional[str] = _f(None, "warm start: an mmm .ckpt, a saved encoder folder or an HF BERT folder whose "
                                  "same-named, same-shaped tensors initialise the model (the rest keep init_std); "
                                  "prints what was loaded, newly initialised and ignored; a resumed run's checkpoint "
                                  "replaces them; null = no warm start")
    sections: Dict[str, Any] = field(default_factory=dict, repr=False, metadata={"sections": True})

    _FIXED = ("encoder", "init_std", "init_from", "sections")

    def __init__(self, encoder: Optional[EncoderConfig] = None, init_std: float = 0.02, init_from: Optional[str] = None,
                 sections: Optional[Dict[str, Any]] = None, **named: Any) -> None:
        self.encoder = encoder if encoder is not None else EncoderConfig()
        self.init_std = init_std
        self.init_from = init_from
        given = {**(sections or {}), **named}
        known = {f.name: f for f in model_sections()}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise TypeError(f"ModelConfig got unknown section(s) {unknown}; registered sections: {sorted(known)}")
        self.sections = {name: given[name] if name in given else f.default_factory() for name, f in known.items()}

    @classmethod
    def config_fields(cls) -> List[dataclasses.Field]:
        """The keys of ``model``: ``encoder``, the registered sections, ``init_std``, ``init_from``."""
        own = {f.name: f for f in dataclasses.fields(cls)}
        return [own["encoder"], *model_sections(), own["init_std"], own["init_from"]]

    def __getattr__(self, name: str) -> Any:  # only reached when normal lookup fails: a section
        sections = self.__dict__.get("sections")
        if name.startswith("_") or sections is None:
            raise AttributeError(name)
        if name not in sections:
            if name in {f.name for f in model_sections()}:  # registered after this config was made
                sections[name] = MODALITIES.get(name).config_class()
            else:
                raise AttributeError(f"ModelConfig has no section {name!r}; sections: {sorted(sections)}")
        return sections[name]

    def __setattr__(self, name: str, value: Any) -> None:
        sections = self.__dict__.get("sections")
        if name not in self._FIXED and sections is not None and name in sections:
            sections[name] = value
        else:
            object.__setattr__(self, name, value)

    def __eq__(self, other: Any) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.encoder, self.init_std, self.init_from, self.sections) == \
            (other.encoder, other.init_std, other.init_from, other.sections)

    def __repr__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in self.config_fields()]
        return f"ModelConfig({', '.join(parts)})"


@dataclass
class ComponentConfig:
    """A registry entry named by string plus its keyword arguments (validated against its signature)."""

    name: str = _f("", "registry name")
    args: Dict[str, Any] = _f(default_factory=dict, help="keyword arguments of the entry")


@dataclass
class ObjectiveConfig:
    """One objective head and its loss weight."""

    name: str = _f("mlm", "objective registry name", choices=_registered("OBJECTIVES"))
    weight: float = _f(1.0, "weight of this loss in the sum", ge=0)
    args: Dict[str, Any] = _f(default_factory=dict, help="keyword arguments of the objective")
    label: Optional[str] = _f(None, "key the head is stored and logged under (default: name); needed when one objective is used twice")


@dataclass
class TaskConfig:
    """One task of a multi-task run: a dataset, its masking, and the heads its batches train.

    Each training step draws one task with probability proportional to ``weight`` (UNITER's
    task sampling) and trains on a batch of that task's stream only.
    """

    name: str = _f("", "task name: batches carry it, heads and metrics are logged under it")
    dataset: str = _f("text", "dataset definition (datasets_def registry name) feeding this task")
    train: str = _f("embedded", "training shards: a directory, a brace pattern, or 'embedded'")
    val: Optional[str] = _f("same", "validation shards: 'same' = the val split of train (its folder's val-*.tar, or the "
                            "embedded set's), or a folder, a pattern, 'embedded'; null = no validation for this task")
    weight: float = _f(1.0, "sampling weight: the task trains on a share weight / sum(weights) of the steps", gt=0)
    masking: ComponentConfig = _f(default_factory=lambda: ComponentConfig("bert_random", {"ratio": 0.15}),
                                  help="masker of this task (registry name + args)")
    objectives: List[str] = _f(default_factory=list, help="heads (objective label or name) this task's batches train")
    options: Dict[str, Any] = _f(default_factory=dict, help="modality-specific stream options (e.g. image_text: mode mlm | mrm | itm | itc)")
    batch_size: Optional[int] = _f(None, "samples per batch; null = data.batch_size", ge=1)


@dataclass
class PhaseConfig:
    """One phase of a phased run: a share of the steps during which only some heads train.

    The CLM-vs-MLM study (Gisserot-Boukhlef et al. 2025) trains ``clm`` for the first share of the
    steps and ``mlm`` for the rest; the phase of a step is a function of the global step alone.
    """

    objectives: List[str] = _f(default_factory=list, help="heads (objective label or name) trained in this phase")
    fraction: float = _f(1.0, "share of trainer.max_steps this phase lasts (the phases' fractions sum to 1)", gt=0, le=1)


@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    dataset: str = _f("text", "dataset definition (datasets_def registry name)")
    train: str = _f("embedded", "training shards: a directory, a brace pattern, or 'embedded' for the built-in corpus")
    val: Optional[str] = _f("same", "validation shards: 'same' = the val split of data.train (its folder's val-*.tar, "
                            "or the embedded set's), or a folder, a pattern, 'embedded'; null = no validation")
    batch_size: int = _f(32, "sequences per packed batch on each device (per micro-batch); derived from "
                         "global_batch_size when that is set", ge=1)
    global_batch_size: Optional[int] = _f(
        None, "sequences per optimizer step over all devices, nodes and accumulation steps (the number papers "
        "quote); batch_size = global / (devices * num_nodes * accumulate_grad_batches), an error if it does "
        "not divide; null = use batch_size per device", ge=1)
    num_workers: int = _f(1, "DataLoader worker processes", ge=0)
    shuffle_buffer: int = _f(2000, "sample shuffle buffer (0 = off)", ge=0)
    shuffle_shards: bool = _f(True, "shuffle the shard order each epoch")
    skip_bad: bool = _f(False, "skip (and count) corrupt samples instead of stopping")
    max_errors: Optional[int] = _f(None, "with skip_bad: stop once more than this many bad samples were seen in one pass over the data (an epoch; summed over DataLoader workers and tasks)", ge=0)
    max_member_bytes: Optional[int] = _f(
        268435456, "refuse shard members larger than this (read from the tar header, before reading), in training, "
        "validation and asset fitting (tokenizers, statistics, codebooks) alike; null = no limit", ge=1)
    read_timeout_s: Optional[float] = _f(
        600.0, "seconds a pipe: or http(s):// shard stream may deliver no data before reading stops with an error "
        "naming the url (training, validation and asset fitting); null = wait forever", gt=0)
    seed: int = _f(0, "seed for shard order, shuffling and masking", ge=0, le=2**32 - 1)
    resampled: bool = _f(False, "draw training shards with replacement, forever (seeded by seed, epoch, rank, worker); "
                         "an epoch is then data.epoch_batches batches per rank instead of one pass over the shards")
    epoch_batches: Optional[int] = _f(None, "with resampled: batches per epoch on each rank (split across its DataLoader "
                                      "workers); required with resampled, refused without it", ge=1)


@dataclass
class OptimConfig:
    """The optimizer (AdamW by default) with warmup and decay."""

    name: str = _f("adamw", "optimizer (mmm.optim registry): adamw (fused), lamb (large batches), sophia (Hutchinson Hessian estimate every hessian_every steps)",
                   choices=_registered("OPTIMIZERS"))
    args: Dict[str, Any] = _f(default_factory=dict, help="the optimizer's own keyword arguments, e.g. sophia: {rho: 0.04, hessian_every: 10}; adamw: {fused: false}")
    lr: float = _f(5e-4, "peak learning rate", gt=0)
    weight_decay: float = _f(0.01, "decoupled weight decay (not applied to biases, norms, or what modules list in no_weight_decay(): learned tokens, position tables)", ge=0)
    betas: Tuple[float, float] = _f((0.9, 0.98), "Adam betas", ge=0, lt=1)
    eps: float = _f(1e-6, "Adam epsilon", gt=0)
    warmup_steps: int = _f(100, "linear warmup steps", ge=0)
    schedule: str = _f("linear", "decay after warmup: linear, cosine, constant", choices=("linear", "cosine", "constant"))
    min_lr_ratio: float = _f(0.0, "lr of the last step (max_steps - 1) as a fraction of the peak", ge=0, le=1)


@dataclass
class TrainerConfig:
    """Arguments passed to ``lightning.Trainer`` (the common ones, typed)."""

    max_steps: int = _f(1000, "optimizer steps to train", ge=1)
    accelerator: str = _f("auto", "cpu, gpu, auto")
    devices: Union[int, str] = _f(1, "number of devices or 'auto'")
    strategy: str = _f("auto", "Lightning strategy: auto, ddp, ddp_find_unused_parameters_true, fsdp, deepspeed, ...")
    num_nodes: int = _f(1, "number of nodes (multi-node runs; see the README's launch section)", ge=1)
    precision: str = _f("32-true", "32-true, bf16-mixed, 16-mixed", choices=_lightning_precisions)
    gradient_clip_val: Optional[float] = _f(1.0, "clip gradient norm; null = off", ge=0)
    accumulate_grad_batches: int = _f(1, "gradient accumulation", ge=1)
    log_every_n_steps: int = _f(10, "logging interval in steps", ge=1)
    val_check_interval: int = _f(200, "validate every this many training steps", ge=1)
    limit_val_batches: int = _f(20, "validation batches per check", ge=0)
    checkpoint_every_n_steps: int = _f(200, "write a checkpoint every this many steps", ge=1)
    default_root_dir: str = _f("runs/mmm", "where logs and checkpoints go")
    enable_progress_bar: bool = _f(True, "show a progress bar")
    ckpt_path: Optional[str] = _f(None, "resume from this checkpoint ('last' = the run's last.ckpt)")
    compile: bool = _f(False, "torch.compile the encoder blocks (GPU runs; dynamic shapes for packed batches)")
    threads: Optional[int] = _f(None, "torch intra-op threads in the training process; null = torch's default (on small shared CPUs 1 is often fastest)", ge=1)
    nonfinite_loss: str = _f("stop", "on a NaN/inf loss: stop (naming step and batch) or skip (drop the batch, count it; single process only)",
                             choices=("stop", "skip"))


@dataclass
class PretrainConfig:
    """A whole pretraining run."""

    model: ModelConfig = _f(default_factory=ModelConfig, help="the network")
    masking: ComponentConfig = _f(
        default_factory=lambda: ComponentConfig("bert_random", {"ratio": 0.15}), help="masker (registry name + args)"
    )
    objectives: List[ObjectiveConfig] = _f(default_factory=lambda: [ObjectiveConfig()], help="objective heads")
    tasks: List[TaskConfig] = _f(default_factory=list, help="multi-task run: tasks sampled per step (each names its dataset, masking and heads); empty = one task from data, masking and objectives")
    phases: List[PhaseConfig] = _f(default_factory=list, help="phased run: consecutive phases, each training some heads for a fraction of the steps (e.g. clm for 0.4, then mlm); empty = every head at every step")
    data: DataConfig = _f(default_factory=DataConfig, help="data")
    optim: OptimConfig = _f(default_factory=OptimConfig, help="optimizer")
    trainer: TrainerConfig = _f(default_factory=TrainerConfig, help="Lightning trainer")
    seed: int = _f(0, "global seed (weights init)", ge=0, le=2**32 - 1)


# ----------------------------------------------------------------------------- parsing


def config_fields(cls: Any) -> List[dataclasses.Field]:
    """The keys of a config dataclass (class or instance): its fields, or, for a config with
    registered sections (:class:`ModelConfig`), its ``config_fields()``."""
    own = getattr(cls, "config_fields", None)
    return own() if own is not None else list(dataclasses.fields(cls))


def _field_types(cls: Any) -> Dict[str, Any]:
    """Key name → type of every key of :func:`config_fields` (resolved annotations)."""
    cls = cls if isinstance(cls, type) else type(cls)
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in config_fields(cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def from_dict(cls: Type[T], data: Dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name.

    Args:
        cls: the dataclass type.
        data: the mapping (e.g. parsed YAML).
        where: a prefix for error messages (file name and dotted key path).
    """
    hints = _field_types(cls)
    fields = {f.name: f for f in config_fields(cls)}
    odd = [k for k in data if not isinstance(k, str)]
    if odd:  # YAML allows numbers, booleans or lists as keys; a config's keys are names
        place = f"in {where} " if where else ""
        raise ConfigError(f"config key {odd[0]!r} {place}is a {type(odd[0]).__name__}, not a name; valid keys "
                          f"here: {sorted(fields)}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        hint = (" (a plug-in modality's section? import its module first: `mmm --plugin MODULE ...` or "
                "MMM_PLUGINS=MODULE)") if cls is ModelConfig else ""
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(fields)}{hint}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _convert(value, hints[name], key)
        _check_value(kwargs[name], fields[name], key)
    return cls(**kwargs)


def _check_value(value: Any, f: dataclasses.Field, key: str) -> None:
    """Raise ConfigError when a string is not one of the field's choices or a number (or a number of a
    tuple) lies outside its range."""
    choices = f.metadata.get("choices")
    if choices is not None and isinstance(value, str):
        allowed = tuple(choices() if callable(choices) else choices)
        if allowed and value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    bounds = f.metadata.get("bounds")
    if not bounds or value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be a finite number, got {v!r} ({f.metadata.get('help', '')})")
        failed = [f"{_BOUNDS[k][0]} {b}" for k, b in bounds.items() if not _BOUNDS[k][1](v, b)]
        if failed or v != v:  # v != v: NaN
            wanted = " and ".join(f"{_BOUNDS[k][0]} {b}" for k, b in bounds.items())
            got = value if len(values) > 1 else v
            raise ConfigError(f"{key} must be {wanted}, got {got!r} ({f.metadata.get('help', '')})")


def check_config(cfg: Any, where: str = "") -> None:
    """Check every field of a config built in code (not loaded) against its range, naming the dotted key.

    :func:`load_config` checks while reading; this covers configs made or changed in Python.
    """
    for f in config_fields(cfg):
        value, key = getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_config(value, key)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_config(item, f"{key}[{i}]")
        else:
            _check_value(value, f, key)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain-data (YAML/JSON/pickle-safe) form of a config dataclass."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in config_fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


class ConfigLoader(yaml.SafeLoader):
    """YAML as configs are read: floats as YAML 1.2 writes them (``4e-2`` and ``1e4`` are numbers, which PyYAML's
    YAML 1.1 rules leave as strings inside ``args`` mappings), and a key repeated in one mapping is an error
    naming both lines instead of the last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} repeated (first at line {seen[key].start_mark.line + 1}); the second "
                                f"would silently replace the first", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``text`` parsed by :class:`ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)


def parse_override_value(text: str) -> Any:
    """Parse a command-line override value as YAML (``50`` → int, ``null`` → None, ``[1,2]`` → list, ``4e-2`` → float).

    A value with a ``#`` that YAML would read as the start of a comment (``runs/a #2``) is kept whole, as a
    string: a shell argument holds no comments, and cutting it would silently change the value.
    """
    if re.search(r"(^|\s)#", text):
        return text
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: Dict[str, Any], overrides: Dict[str, Any], cls: Type[Any]) -> Dict[str, Any]:
    """Set dotted keys (``trainer.max_steps``) in a nested mapping, checking each path exists in ``cls``."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node, tp = data, cls
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # an entry of a list of sections: --tasks.0.train
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override --{dotted}: {'.'.join(parts[:i])!r} has {len(node)} entries; "
                                      f"{part!r} is not one of their indices 0..{len(node) - 1}")
                if last:
                    node[int(part)] = value
                elif not isinstance(node[int(part)], dict):
                    raise ConfigError(f"override --{dotted}: entry {'.'.join(parts[:i + 1])!r} is not a mapping")
                else:
                    node = node[int(part)]
                continue
            item_type = None
            if tp is not None and dataclasses.is_dataclass(tp):
                types = _field_types(tp)
                if part not in types:
                    raise ConfigError(f"unknown override --{dotted}: {'.'.join(parts[:i + 1])!r} is not a key; valid: {sorted(types)}")
                hint = types[part]
                args = typing.get_args(hint)
                if typing.get_origin(hint) in (list, List) and args and dataclasses.is_dataclass(args[0]):
                    item_type = args[0]
                tp = item_type or (hint if dataclasses.is_dataclass(hint) else None)
            if last:
                node[part] = value
            elif item_type is not None:
                child = node.get(part)
                if not isinstance(child, list):
                    raise ConfigError(f"override --{dotted}: the config has no {part!r} list to index "
                                      f"(set it in the YAML file)")
                node = child
            else:
                child = node.get(part)
                if child is None:
                    child = {}
                    node[part] = child
                elif not isinstance(child, dict):  # replacing it would drop the file's value without a word
                    raise ConfigError(f"override --{dotted}: {_indexed('.'.join(parts[:i + 1]))} is "
                                      f"{type(child).__name__} {child!r:.60} in the config, not a section of "
                                      f"settings; fix it in the YAML file")
                node = child
    return data


def _indexed(dotted: str) -> str:
    """An override's key as error messages name it: ``tasks.0.weight`` → ``tasks[0].weight``."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", dotted)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[Dict[str, Any]] = None) -> PretrainConfig:
    """Read a YAML file (optional) and apply dotted overrides into a :class:`PretrainConfig`.

    Args:
        path: YAML file; None = defaults only.
        overrides: ``{"trainer.max_steps": 50, ...}`` applied after the file.
    """
    data: Dict[str, Any] = {}
    where = "config"
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--config {p} is a folder; give a YAML file (e.g. {p}/config.yaml of a run)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = load_yaml(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); save the "
                              f"config as UTF-8") from None
        if loaded is None:  # an empty file (or only comments): a run of the bare defaults is never what was meant
            raise ConfigError(f"{p}: the file holds no settings (empty, or only comments); expected a mapping such as "
                              f"'model: ...', or pass --defaults instead of --config to train the built-in defaults")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
        where = str(p)
    section = data.get("data")
    file_batch_size = isinstance(section, dict) and "batch_size" in section
    if overrides:
        data = apply_overrides(data, overrides, PretrainConfig)
    try:
        cfg = from_dict(PretrainConfig, data)
        for name in ("default_root_dir", "ckpt_path"):  # as Lightning expands it: one folder, not ./~ and $HOME
            value = getattr(cfg.trainer, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(cfg.trainer, name, os.path.expanduser(value))
        # data.batch_size counts as given when set at the level of data.global_batch_size or later: a
        # --data.global_batch_size override derives it over the file's batch_size (flat precedence)
        ov = overrides or {}
        section_override = ov.get("data") if isinstance(ov.get("data"), dict) else None  # replaces the file's

        def overridden(key: str) -> bool:
            return f"data.{key}" in ov or (section_override is not None and key in section_override)

        from_file = file_batch_size and section_override is None
        resolve_batch_size(cfg, explicit_batch_size=overridden("batch_size")
                           or (from_file and not overridden("global_batch_size")))
        return cfg
    except ConfigError as e:
        text = str(e)  # a bad value given on the command line is named as the override, not as the file's
        given = next((k for k in overrides or {} if text.startswith((f"{k}:", f"{k} ", f"{_indexed(k)}:",
                                                                       f"{_indexed(k)} "))), None)
        raise ConfigError(f"override --{given}: {text}" if given else f"{where}: {text}") from None


def data_parallel_size(trainer: TrainerConfig) -> int:
    """Processes that each draw a batch per step: ``devices * num_nodes`` (``devices`` must be a count)."""
    devices = trainer.devices
    if isinstance(devices, str):
        if devices.strip().isdigit():
            devices = int(devices)
        else:
            raise ConfigError(f"data.global_batch_size needs trainer.devices as a number of devices, got {devices!r}")
    return int(devices) * int(trainer.num_nodes)


def resolve_batch_size(cfg: PretrainConfig, explicit_batch_size: bool = False) -> None:
    """Derive ``data.batch_size`` (per device, per micro-batch) from ``data.global_batch_size``.

    Args:
        cfg: the config, changed in place.
        explicit_batch_size: ``data.batch_size`` was given too; then it must equal the derived value.
    """
    d, t = cfg.data, cfg.trainer
    if d.global_batch_size is None:
        return
    if d.global_batch_size < 1:
        raise ConfigError(f"data.global_batch_size must be >= 1, got {d.global_batch_size}")
    world, accum = data_parallel_size(t), int(t.accumulate_grad_batches)
    share = world * accum
    if d.global_batch_size % share:
        raise ConfigError(f"data.global_batch_size {d.global_batch_size} does not divide by trainer.devices * "
                          f"trainer.num_nodes * trainer.accumulate_grad_batches = {t.devices} * {t.num_nodes} * {accum} = {share}")
    per_device = d.global_batch_size // share
    if explicit_batch_size and d.batch_size != per_device:
        raise ConfigError(f"data.batch_size {d.batch_size} contradicts data.global_batch_size {d.global_batch_size} "
                          f"(= {per_device} per device over {world} device(s) x {accum} accumulation step(s)); set one of them")
    d.batch_size = per_device


def global_batch_size(cfg: PretrainConfig) -> int:
    """Sequences per optimizer step over all processes and accumulation steps."""
    return cfg.data.batch_size * data_parallel_size(cfg.trainer) * int(cfg.trainer.accumulate_grad_batches)


def dump_config(cfg: Any, indent: int = 0) -> str:
    """YAML text of a config with each field's help as a comment above it."""
    lines: List[str] = []
    pad = "  " * indent
    for f in config_fields(cfg):
        value = getattr(cfg, f.name)
        help_text = f.metadata.get("help", "")
        if help_text:
            lines.append(f"{pad}# {help_text}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(dump_config(value, indent + 1))
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            lines.append(f"{pad}{f.name}:")
            for item in value:
                body = yaml.safe_dump(to_dict(item), sort_keys=False, default_flow_style=None).rstrip().splitlines()
                lines.append(f"{pad}  - {body[0]}")
                lines.extend(f"{pad}    {b}" for b in body[1:])
        else:
            v = list(value) if isinstance(value, tuple) else value
            text = yaml.safe_dump({f.name: v}, sort_keys=False, default_flow_style=True, width=10_000).strip()
            text = text[1:-1] if text.startswith("{") else text
            lines.append(f"{pad}{text}")
    return "\n".join(lines)
