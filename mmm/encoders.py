"""Pretrained encoders as plain ``nn.Module`` s: load one, run it on a padded batch, save it.

A :class:`TextEncoder` is the text embedder plus the shared
:class:`~mmm.core.encoder.TransformerEncoder` of a :class:`~mmm.model.MaskedModel`, without the
objective heads and without Lightning. It takes the right-padded ``(input_ids, attention_mask)``
pair HF ``transformers`` models take and returns ``(B, T, H)`` hidden states, so it can stand in
for a ``BertModel`` in downstream code. DNA encoders are :class:`TextEncoder` s over nucleotide
tokens; image and audio have their own (:mod:`mmm.modalities.image.embedder`, :mod:`mmm.modalities.audio.embedder`).

:func:`load_encoder` reads, for any registered modality that has a standalone encoder:

* an mmm Lightning checkpoint (``.ckpt``) written by :mod:`mmm.train.pretrain`, through
  :func:`mmm.checkpoint.read_checkpoint` and the modality's ``encoder_from_checkpoint``;
* a directory written by :func:`save_encoder` (``mmm_encoder.json`` + ``model.safetensors`` + what
  the modality saves beside them, e.g. ``tokenizer/`` or ``audio_frontend.json``);
* a source the modality reads itself (``load_foreign_encoder``): an HF BERT folder (text), a timm
  ViT weights file (image).

Nothing here names a modality: each one's :class:`~mmm.modalities.base.Modality` is found in
:data:`mmm.registry.MODALITIES`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from mmm.checkpoint import (CHECKPOINT_FORMAT, CheckpointContents, load_weights, read_checkpoint,  # noqa: F401
                            safe_torch_load)
from mmm.config import ConfigError, ModelConfig, from_dict, to_dict
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import pack_padded
from mmm.errors import CheckpointError
from mmm.model import build_text_embedder
from mmm.registry import ATTENTION_BACKENDS, MODALITIES

PathLike = Union[str, Path]

ENCODER_FORMAT = "mmm-encoder-v1"
ENCODER_META_FILE = "mmm_encoder.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_SUBDIR = "tokenizer"


class TextEncoder(nn.Module):
    """Text embedder + shared Transformer encoder: ``(B, T)`` token ids → ``(B, T, H)`` hidden states.

    Padded positions of the output are exactly zero. (HF ``BertModel`` computes finite but
    meaningless values there; compare the two on real tokens only.)

    Args:
        embedder: a :class:`~mmm.modalities.text.embedder.TextEmbedder`.
        encoder: the shared :class:`~mmm.core.encoder.TransformerEncoder`.
        config: the model configuration both were built from (kept for :func:`save_encoder`).
        tokenizer: the matching tokenizer, or None; exposed as ``self.tokenizer``.
    """

    def __init__(self, embedder: nn.Module, encoder: TransformerEncoder, config: ModelConfig,
                 tokenizer: Optional[Any] = None, modality: str = "text") -> None:
        super().__init__()
        self.embedder = embedder
        self.encoder = encoder
        self.config = config
        self.tokenizer = tokenizer
        self.modality = modality

    @classmethod
    def from_config(cls, config: ModelConfig, vocab_size: int, pad_id: int = 0,
                    tokenizer: Optional[Any] = None, modality: str = "text") -> "TextEncoder":
        """Build a freshly initialised encoder (weights are expected to be loaded afterwards).

        Args:
            config: network configuration.
            vocab_size: number of token ids.
            pad_id: padding id.
            tokenizer: optional tokenizer to attach.
        """
        sep_id = getattr(tokenizer, "sep_id", None)
        return cls(build_text_embedder(config, vocab_size, pad_id, modality, sep_id), TransformerEncoder(config.encoder),
                   config, tokenizer, modality)

    @property
    def hidden_size(self) -> int:
        return self.config.encoder.dim

    @property
    def vocab_size(self) -> int:
        return self.embedder.tokens.num_embeddings

    @property
    def pad_id(self) -> int:
        return int(self.embedder.pad_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode a right-padded batch.

        Args:
            input_ids: (B, T) integer token ids.
            attention_mask: (B, T) with 1 on real tokens then 0 on padding in each row (right
                padding); None = every position is real.

        Returns:
            (B, T, H) hidden states; zeros at padded positions.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor (torch.long), got dtype {input_ids.dtype}")
        b, t = input_ids.shape
        if b == 0 or t == 0:
            raise ValueError(f"input_ids is empty (shape {(b, t)}); need at least one token per sequence")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(f"attention_mask must have the shape of input_ids {(b, t)}, got {shape}")
            if attention_mask.dtype != torch.bool:
                if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                    raise ValueError("attention_mask must hold only 0 and 1 (1 = real token)")
                attention_mask = attention_mask != 0
        try:
            seq = pack_padded(attention_mask)
        except ValueError as e:
            if "right-padded" in str(e):
                raise ValueError("attention_mask must be right-padded (ones then zeros in every row); left padding "
                                 "is not supported -- pad on the right (tokenizer padding_side='right')") from None
            raise
        limit = self.embedder.max_len
        if self.embedder.positions.weight is not None and seq.max_seqlen > limit:
            raise ValueError(f"a sequence has {seq.max_seqlen} real tokens but this encoder's position table holds "
                             f"max_len={limit}; truncate or chunk the input to at most {limit} tokens")
        ids = input_ids[attention_mask].long()  # (N,) row-major = packed order for right padding
        if bool((ids < 0).any()) or bool((ids >= self.vocab_size).any()):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}) on real tokens, got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        x = self.embedder(ids, seq.position_ids)
        hidden = seq.pad(self.encoder(x, seq))  # (B, T_max, H)
        if hidden.shape[1] < t:
            hidden = torch.cat([hidden, hidden.new_zeros(b, t - hidden.shape[1], hidden.shape[2])], dim=1)
        return hidden


# ----------------------------------------------------------------------------- token encoders (text, DNA)


def token_encoder_from_checkpoint(contents: CheckpointContents, modality: str) -> TextEncoder:
    """The :class:`TextEncoder` of a discrete-token modality (``text``, ``dna``) of a read checkpoint,
    with the run's tokenizer attached when the checkpoint stores one (eval mode).

    Args:
        contents: from :func:`~mmm.checkpoint.read_checkpoint`.
        modality: the modality whose embedder and tokenizer to take.
    """
    state = contents.modality_state(modality)
    key = "embedder.tokens.weight"
    if key not in state:
        raise ValueError(f"{contents.path}: no 'model.embedders.{modality}.tokens.weight' in the state_dict; "
                         f"not a {modality} model")
    vocab = int(state[key].shape[0])
    tok = contents.modality(modality).tokenizer if contents.assets.get(modality) else None
    if tok is not None and tok.vocab_size != vocab:
        raise ValueError(f"{contents.path}: the embedded tokenizer has {tok.vocab_size} ids but the token table has {vocab}")
    enc = TextEncoder.from_config(contents.config.model, vocab, tok.pad_id if tok is not None else 0, tok,
                                  modality=modality)
    load_weights(enc, state, contents.path)
    return contents.finish_encoder(enc, modality)


class TokenEncoderParts:
    """The standalone-encoder class methods of a discrete-token modality (text, DNA): a
    :class:`TextEncoder` over its token ids with its tokenizer attached. Mixed into the modality
    (``class TextModality(TokenEncoderParts, Modality)``), which sets :attr:`load_tokenizer`."""

    name: str
    load_tokenizer: Callable[[Path], Any]
    """Reads a tokenizer saved in a folder (``staticmethod(TextTokenizer.load)``)."""

    @classmethod
    def encoder_from_checkpoint(cls, contents: CheckpointContents) -> nn.Module:
        """The :class:`TextEncoder` of a read checkpoint, the run's tokenizer attached (eval mode)."""
        return token_encoder_from_checkpoint(contents, cls.name)

    @classmethod
    def encoder_meta(cls, encoder: nn.Module) -> Dict[str, Any]:
        return {"vocab_size": encoder.vocab_size, "pad_id": encoder.pad_id}

    @classmethod
    def save_encoder_files(cls, encoder: nn.Module, directory: Path) -> None:
        """The tokenizer, when the encoder has one, in ``directory/tokenizer``; a ``tokenizer/`` left
        there by an earlier save is removed first (it belongs to another encoder)."""
        tok_dir = directory / TOKENIZER_SUBDIR
        if tok_dir.is_dir() and not tok_dir.is_symlink():
            shutil.rmtree(tok_dir)
        elif tok_dir.exists() or tok_dir.is_symlink():
            tok_dir.unlink()
        if getattr(encoder, "tokenizer", None) is not None:
            encoder.tokenizer.save(tok_dir)

    @classmethod
    def load_saved_encoder(cls, directory: Path, meta: Dict[str, Any]) -> nn.Module:
        meta_path = directory / ENCODER_META_FILE
        for key in ("vocab_size", "pad_id"):
            if key not in meta:
                raise ValueError(f"{meta_path}: missing key {key!r}")
        cfg = parse_encoder_config(ModelConfig, meta, directory)
        tok_dir = directory / TOKENIZER_SUBDIR
        tok = cls.load_tokenizer(tok_dir) if tok_dir.is_dir() else None
        vocab = int(meta["vocab_size"])
        if tok is not None and tok.vocab_size > vocab:
            raise ValueError(f"{tok_dir}: the tokenizer has {tok.vocab_size} ids but the encoder's token table "
                             f"({meta_path}: vocab_size) has {vocab}; it belongs to another encoder -- remove "
                             f"{tok_dir} or save the encoder again")
        enc = TextEncoder.from_config(cfg, vocab, int(meta["pad_id"]), tok, modality=cls.name)
        return load_saved_weights(enc, directory)


# ----------------------------------------------------------------------------- save / load


def parse_encoder_config(cls: type, meta: Dict[str, Any], directory: Path) -> Any:
    """``meta["model"]`` of a :func:`save_encoder` folder as config dataclass ``cls`` (errors name the file)."""
    try:
        return from_dict(cls, meta["model"], "model")
    except ConfigError as e:
        raise ValueError(f"{directory / ENCODER_META_FILE}: {e}") from None


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file; an unreadable one (truncated, corrupt header) is a
    :class:`~mmm.errors.CheckpointError` naming ``path``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' SafetensorError names neither the file nor the fix
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                              "truncated or corrupt -- write it again") from None


def load_saved_weights(encoder: nn.Module, directory: Path) -> nn.Module:
    """Fill ``encoder`` from the folder's ``model.safetensors``; eval mode."""
    weights = directory / WEIGHTS_FILE
    load_weights(encoder, read_safetensors(weights), weights)
    return encoder.eval()


def encoder_modalities() -> List[str]:
    """The registered modalities that have a standalone encoder (:func:`load_encoder` builds them),
    in the modalities' order."""
    from mmm.modalities.base import Modality

    names = [n for n in MODALITIES.list()
             if getattr(MODALITIES.get(n), "encoder_from_checkpoint", None) is not None
             and MODALITIES.get(n).encoder_from_checkpoint.__func__ is not Modality.encoder_from_checkpoint.__func__]
    return sorted(names, key=lambda n: (MODALITIES.get(n).order, n))


def _encoder_modality(modality: str) -> Any:
    """The registered modality class ``modality``, refused unless it has a standalone encoder."""
    supported = encoder_modalities()
    if modality not in supported:
        raise ValueError(f"unknown modality {modality!r}; supported: {supported}")
    return MODALITIES.get(modality)


def encoder_from_checkpoint(contents: CheckpointContents, modality: str = "text") -> nn.Module:
    """The standalone encoder of ``modality`` in a read checkpoint (eval mode).

    Args:
        contents: from :func:`~mmm.checkpoint.read_checkpoint`.
        modality: a registered modality with a standalone encoder (:func:`encoder_modalities`).
    """
    return _encoder_modality(modality).encoder_from_checkpoint(contents)


def save_encoder(encoder: nn.Module, directory: PathLike) -> Path:
    """Write ``mmm_encoder.json``, ``model.safetensors`` and what the encoder needs to read raw input
    (its modality's ``save_encoder_files``: ``tokenizer/`` for text and DNA, ``audio_frontend.json``
    for audio -- the fitted front end's config and normalisation statistics).

    An audio encoder's k-means codebooks are training targets, not part of the encoder, and are not
    saved (they stay in the run's checkpoints and ``audio/`` folder).

    Args:
        encoder: a standalone encoder: a :class:`TextEncoder` (text or DNA), an
            :class:`~mmm.modalities.image.embedder.ImageEncoder`, an :class:`~mmm.modalities.audio.embedder.AudioEncoder`,
            or another registered modality's, named by its ``modality`` attribute and holding its
            ``config`` dataclass.
        directory: output folder, created if needed.

    Returns:
        The folder; :func:`load_encoder` reads it back.
    """
    from safetensors.torch import save_file

    modality = getattr(encoder, "modality", None)
    if not isinstance(encoder, nn.Module) or not isinstance(modality, str) or modality not in encoder_modalities():
        raise TypeError(f"save_encoder expects a TextEncoder, an ImageEncoder or an AudioEncoder (a standalone "
                        f"encoder of a registered modality), got {type(encoder).__name__}")
    spec = MODALITIES.get(modality)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cannot save encoder: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": ENCODER_FORMAT, "modality": modality, "model": to_dict(encoder.config),
            **spec.encoder_meta(encoder)}
    (out / ENCODER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    spec.save_encoder_files(encoder, out)
    return out


def _load_saved_encoder(directory: Path, modality: str) -> nn.Module:
    meta_path = directory / ENCODER_META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{meta_path}: 'format' must be {ENCODER_FORMAT!r}, got "
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    for key in ("model", "modality"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    if meta["modality"] != modality:
        raise ValueError(f"{meta_path} holds a {meta['modality']!r} encoder, but modality={modality!r} was asked for")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"encoder weights {weights} are missing")
    return MODALITIES.get(modality).load_saved_encoder(directory, meta)


def _check_attention(attention: Any) -> None:
    known = ["auto", *ATTENTION_BACKENDS.list()]
    if not isinstance(attention, str) or attention not in known:
        raise ValueError(f"load_encoder: attention={attention!r} is not an attention backend; expected one of {known}")


def set_attention(encoder: nn.Module, attention: str) -> nn.Module:
    """Set the attention backend of a standalone encoder's Transformer (``encoder.encoder``) to ``attention``.

    Every backend computes the same function, so this is a compute choice, not a model property:
    ``auto`` (xformers on CUDA when installed, else SDPA; ``$MMM_ATTENTION`` overrides it) or a
    registered backend (``sdpa``, ``math``, ``xformers``, ``flex``).
    """
    _check_attention(attention)
    core = getattr(encoder, "encoder", None)
    if not isinstance(core, TransformerEncoder):
        return encoder
    if attention == "flex" and core.cfg.attn_dropout > 0:
        raise ValueError(f"load_encoder: attention='flex' has no attention dropout, but this encoder's "
                         f"encoder.attn_dropout is {core.cfg.attn_dropout}; choose another backend")
    configs = [core.cfg]
    own = getattr(getattr(encoder, "config", None), "encoder", None)
    if own is not None and own is not core.cfg:
        configs.append(own)  # what save_encoder writes
    for cfg in configs:
        cfg.attention = attention
    core._resolve_for_parameters()  # resolved once here, not in every forward
    return encoder


def load_encoder(source: PathLike, modality: str = "text", attention: Optional[str] = "auto",
                 **options: Any) -> nn.Module:
    """Load a pretrained encoder in eval mode.

    Args:
        source: an mmm ``.ckpt`` file (any run that trained ``modality``), a :func:`save_encoder`
            directory, or a source the modality reads itself: an HF BERT directory (text), a timm
            ViT weights file (image, with ``timm_model``).
        modality: which encoder to build (:func:`encoder_modalities`): ``text`` or ``dna``
            (:class:`TextEncoder` over token ids, ``(ids, mask) -> (B, T, H)``, with the tokenizer
            attached), ``image`` (:class:`~mmm.modalities.image.embedder.ImageEncoder`, ``(B, C, H, W) ->
            (B, N, D)``, CLS first when the model has one), ``audio``
            (:class:`~mmm.modalities.audio.embedder.AudioEncoder`, ``(B, T, F)`` feature tokens -> ``(B, T, d)``,
            and ``encode_waveform`` with the fitted front end attached), or any other registered one.
        attention: the attention backend the loaded encoder runs with (:func:`set_attention`):
            ``auto`` (default: xformers on CUDA when installed, else SDPA; ``$MMM_ATTENTION``
            overrides it), ``sdpa``, ``math``, ``xformers`` or ``flex``; None keeps the one the source
            was trained with. All compute the same function, so an encoder trained with xformers
            loads and runs on CPU.
        options: options of a source the modality reads itself (None values count as not given);
            image: ``timm_model`` (the timm model name of a weights file, ``.safetensors`` / ``.pth``
            / ``.pt`` / ``.bin``) and ``timm_kwargs`` (extra ``timm.create_model`` arguments, e.g. ``{"img_size": 32}``).
    """
    spec = _encoder_modality(modality)
    if attention is not None:
        _check_attention(attention)  # refused before anything is read
    encoder = _load(source, spec, modality, {k: v for k, v in options.items() if v is not None})
    return encoder if attention is None else set_attention(encoder, attention)


def _load(source: PathLike, spec: Any, modality: str, options: Dict[str, Any]) -> nn.Module:
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"encoder source {p} does not exist")
    if options:
        return spec.load_foreign_encoder(p, **options)
    if p.is_dir() and (p / ENCODER_META_FILE).is_file():
        return _load_saved_encoder(p, modality)
    foreign = spec.load_foreign_encoder(p)
    if foreign is not None:
        return foreign
    if p.is_file():
        return spec.encoder_from_checkpoint(read_checkpoint(p))
    if (p / "config.json").is_file():
        raise ValueError(f"{p} holds an HF config.json, which mmm reads as a text (BERT) encoder only, not as "
                         f"a {modality} encoder; pass a .ckpt file or a save_encoder folder of that modality")
    raise ValueError(f"{p} is a directory but holds neither {ENCODER_META_FILE} (save_encoder) nor, for text, "
                     "config.json (HF BERT); pass a .ckpt file or one of those directories")
