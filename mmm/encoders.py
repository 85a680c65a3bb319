"""Pretrained encoders as plain ``nn.Module`` s: load one, run it on a padded batch, save it.

A :class:`TextEncoder` is the text embedder plus the shared
:class:`~mmm.core.encoder.TransformerEncoder` of a :class:`~mmm.model.MaskedModel`, without the
objective heads and without Lightning. It takes the right-padded ``(input_ids, attention_mask)``
pair HF ``transformers`` models take and returns ``(B, T, H)`` hidden states, so it can stand in
for a ``BertModel`` in downstream code.

:func:`load_encoder` reads three sources:

* an mmm Lightning checkpoint (``.ckpt``) written by :mod:`mmm.train.pretrain` -- loaded with
  ``torch.load(weights_only=True)``, so a file carrying pickled code is refused, never run;
  the network is rebuilt from the config and tokenizer files stored under ``checkpoint["mmm"]``;
* a directory written by :func:`save_encoder` (``mmm_encoder.json`` + ``model.safetensors`` +
  ``tokenizer/`` or, for audio, ``audio_frontend.json``);
* an HF BERT directory (``config.json`` + weights), through :func:`mmm.interop.hf.import_hf_bert`.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from mmm.config import ConfigError, ModelConfig, PretrainConfig, from_dict, to_dict
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import pack_padded
from mmm.modalities.text_modality import tokenizer_from_files
from mmm.modalities.text_tokenizer import TextTokenizer
from mmm.model import build_text_embedder

PathLike = Union[str, Path]

MODALITIES = ("text", "image", "dna", "audio")
"""Modalities :func:`load_encoder` can build."""

CHECKPOINT_FORMAT = "mmm-pretrain-v1"
ENCODER_FORMAT = "mmm-encoder-v1"
ENCODER_META_FILE = "mmm_encoder.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_SUBDIR = "tokenizer"


class TextEncoder(nn.Module):
    """Text embedder + shared Transformer encoder: ``(B, T)`` token ids → ``(B, T, H)`` hidden states.

    Padded positions of the output are exactly zero. (HF ``BertModel`` computes finite but
    meaningless values there; compare the two on real tokens only.)

    Args:
        embedder: a :class:`~mmm.modalities.text.TextEmbedder`.
        encoder: the shared :class:`~mmm.core.encoder.TransformerEncoder`.
        config: the model configuration both were built from (kept for :func:`save_encoder`).
        tokenizer: the matching tokenizer, or None; exposed as ``self.tokenizer``.
    """

    def __init__(self, embedder: nn.Module, encoder: TransformerEncoder, config: ModelConfig,
                 tokenizer: Optional[TextTokenizer] = None, modality: str = "text") -> None:
        super().__init__()
        self.embedder = embedder
        self.encoder = encoder
        self.config = config
        self.tokenizer = tokenizer
        self.modality = modality

    @classmethod
    def from_config(cls, config: ModelConfig, vocab_size: int, pad_id: int = 0,
                    tokenizer: Optional[TextTokenizer] = None, modality: str = "text") -> "TextEncoder":
        """Build a freshly initialised encoder (weights are expected to be loaded afterwards).

        Args:
            config: network configuration.
            vocab_size: number of token ids.
            pad_id: padding id.
            tokenizer: optional tokenizer to attach.
        """
        return cls(build_text_embedder(config, vocab_size, pad_id, modality), TransformerEncoder(config.encoder), config,
                   tokenizer, modality)

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


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointContents:
    """What an mmm pretraining checkpoint holds, as plain data.

    Args:
        path: the checkpoint file.
        config: the run's configuration.
        state_dict: model weights with the Lightning ``model.`` prefix removed.
        tokenizer: the text tokenizer rebuilt from the embedded files, or None if none was stored.
        assets: modality → {file name: text} of every modality's assets (tokenizers, statistics).
    """

    path: Path
    config: PretrainConfig
    state_dict: Dict[str, torch.Tensor]
    tokenizer: Optional[TextTokenizer]
    assets: Dict[str, Dict[str, str]]
    modality_order: Optional[List[str]] = None

    def modality_vector(self, modality: str) -> Optional[torch.Tensor]:
        """The learned modality embedding the model added to ``modality``'s tokens, or None for a
        single-modality model (its encoders must add it to match what the shared encoder saw)."""
        table = self.state_dict.get("modality_embed.weight")
        if table is None:
            return None
        order = self.modality_order
        if not order or modality not in order or len(order) != table.shape[0]:
            raise ValueError(f"{self.path}: the model has a modality embedding ({table.shape[0]} rows) but the "
                             f"checkpoint's modality list {order!r} does not place {modality!r} in it")
        return table[order.index(modality)]

    def modality_state(self, modality: str) -> Dict[str, torch.Tensor]:
        """Weights of one modality's encoder path: ``embedders.<modality>.*`` as ``embedder.*``, and ``encoder.*``."""
        prefix = f"embedders.{modality}."
        state = {"embedder." + k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
        if not state:
            found = sorted({k.split(".")[1] for k in self.state_dict if k.startswith("embedders.")})
            raise ValueError(f"{self.path}: the checkpoint has no {modality!r} embedder (modalities: {found})")
        state.update({k: v for k, v in self.state_dict.items() if k.startswith("encoder.")})
        if any(".mlp.experts." in k for k in state):  # modality experts: this modality's MLP becomes the plain one
            from mmm.core.encoder import fold_modality_experts

            if modality not in (self.modality_order or []):
                raise ValueError(f"{self.path}: the encoder has modality experts but the checkpoint's modality list "
                                 f"{self.modality_order!r} does not place {modality!r} among them")
            state = fold_modality_experts(state, self.modality_order.index(modality))
        return state


def safe_torch_load(path: Path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name ``path``.

    A file whose pickle references anything beyond tensors and plain containers (a class with a
    ``__reduce__`` payload, say) is refused before any of it runs.

    Args:
        path: a file written by ``torch.save``.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].strip()
        if "Unsupported global" in text:
            raise ValueError(f"refusing to load {path}: it contains pickled objects other than tensors and plain "
                             f"data, and mmm only unpickles with torch.load(weights_only=True) ({detail})") from None
        raise ValueError(f"{path} is not a PyTorch checkpoint torch.load can read safely ({detail or text})") from None
    except Exception as e:  # a truncated zip, a foreign format
        raise ValueError(f"{path} is not a PyTorch checkpoint torch.load can read: {type(e).__name__}: {e}") from None


def read_checkpoint(path: PathLike) -> CheckpointContents:
    """Read an mmm Lightning checkpoint safely (``weights_only=True``: tensors and plain data only).

    Args:
        path: a ``.ckpt`` written by ``mmm pretrain``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist or is not a file")
    ckpt = safe_torch_load(p)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{p} is not a Lightning checkpoint: expected a dict with a 'state_dict' entry")
    meta = ckpt.get("mmm")
    if not isinstance(meta, dict):
        raise ValueError(f"{p} has no 'mmm' section (config and tokenizer); was it written by `mmm pretrain`?")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p}: checkpoint['mmm']['format'] is {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{p}: checkpoint['mmm']['config'] is missing or not a mapping")
    try:
        cfg = from_dict(PretrainConfig, meta["config"], "checkpoint['mmm']['config']")
    except ConfigError as e:
        raise ValueError(f"{p}: {e}") from None
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"{p}: state_dict has no 'model.*' keys (found e.g. {sorted(ckpt['state_dict'])[:3]})")
    assets = meta.get("assets") or {}
    if not isinstance(assets, dict) or not all(isinstance(v, dict) for v in assets.values()):
        raise ValueError(f"{p}: checkpoint['mmm']['assets'] must map modality names to {{file name: text}}")
    tokenizer = None
    if assets.get("text"):
        tokenizer = tokenizer_from_files(assets["text"], str(p))
    order = meta.get("modalities")
    if order is not None and not (isinstance(order, list) and all(isinstance(m, str) for m in order)):
        raise ValueError(f"{p}: checkpoint['mmm']['modalities'] must be a list of modality names, got {order!r}")
    return CheckpointContents(p, cfg, state, tokenizer, assets, order)


def fold_modality_vector(embedder: nn.Module, vector: Optional[torch.Tensor]) -> None:
    """Absorb a constant ``vector`` added to every output token of ``embedder`` into its weights.

    A multimodal :class:`~mmm.model.MaskedModel` adds a learned modality embedding after each
    embedder; a single-modality encoder loaded from it folds that vector into the embedder (exact
    in eval mode), so it stays a plain embedder + encoder that exports to HF / timm unchanged.

    Args:
        embedder: a text/DNA, image or audio embedder.
        vector: (d,) the modality embedding, or None (nothing to do).
    """
    if vector is None:
        return
    from mmm.modalities.audio import AudioEmbedder
    from mmm.modalities.image import ImageEmbedder
    from mmm.modalities.text import TextEmbedder

    v = vector.detach().to(next(embedder.parameters()).dtype)
    with torch.no_grad():
        norm = getattr(embedder, "norm", None)
        if isinstance(norm, nn.LayerNorm) and norm.bias is not None:
            norm.bias += v  # output = dropout(LN(x)): the constant joins LN's bias
        elif isinstance(embedder, TextEmbedder):
            embedder.tokens.weight += v  # every token takes exactly one row of the table
        elif isinstance(embedder, ImageEmbedder):
            embedder.patch_embed.proj.bias += v  # visible patches
            embedder.mask_token += v  # hidden patches (mask-token mode)
            if embedder.cls_token is not None:
                embedder.cls_token += v
        elif isinstance(embedder, AudioEmbedder):
            embedder.proj.bias += v
            embedder.mask_embedding += v
        else:
            raise TypeError(f"cannot fold a modality embedding into a {type(embedder).__name__}")


def finish_modality_encoder(encoder: nn.Module, contents: "CheckpointContents", modality: str) -> nn.Module:
    """Fold the checkpoint's modality embedding for ``modality`` into ``encoder.embedder``; eval mode."""
    fold_modality_vector(encoder.embedder, contents.modality_vector(modality))
    return encoder.eval()


def load_weights(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: PathLike, hint: str = "") -> None:
    """``load_state_dict(strict=True)`` with an error that names ``source`` and the differing keys.

    Args:
        module: the module to fill.
        state_dict: weights keyed like ``module.state_dict()``.
        source: file the weights came from (for the message).
        hint: appended to the message in parentheses (what to check), or empty.
    """
    tail = f" ({hint})" if hint else ""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}{tail}")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: weight {k!r} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}{tail}")
    module.load_state_dict(state_dict, strict=True)


def encoder_from_checkpoint(contents: CheckpointContents) -> TextEncoder:
    """Build the :class:`TextEncoder` of a read checkpoint (eval mode).

    Args:
        contents: from :func:`read_checkpoint`.
    """
    state = contents.modality_state("text")
    if "embedder.tokens.weight" not in state:
        raise ValueError(f"{contents.path}: no 'model.embedders.text.tokens.weight' in the state_dict; not a text model")
    vocab = int(state["embedder.tokens.weight"].shape[0])
    tok = contents.tokenizer
    if tok is not None and tok.vocab_size != vocab:
        raise ValueError(f"{contents.path}: the embedded tokenizer has {tok.vocab_size} ids but the token table has {vocab}")
    pad_id = tok.pad_id if tok is not None else 0
    enc = TextEncoder.from_config(contents.config.model, vocab, pad_id, tok)
    load_weights(enc, state, contents.path)
    return finish_modality_encoder(enc, contents, "text")


def dna_encoder_from_checkpoint(contents: CheckpointContents) -> TextEncoder:
    """The DNA token encoder of a read checkpoint (a :class:`TextEncoder` over nucleotide-token ids,
    with the run's DNA tokenizer attached; eval mode)."""
    from mmm.modalities.dna_modality import DNAModality

    modality = DNAModality(contents.config.model)
    modality.load_assets(contents.assets.get("dna", {}), str(contents.path))
    state = contents.modality_state("dna")
    tok = modality.tokenizer
    enc = TextEncoder.from_config(contents.config.model, tok.vocab_size, tok.pad_id, tok, modality="dna")
    load_weights(enc, state, contents.path)
    return finish_modality_encoder(enc, contents, "dna")


def image_encoder_config(cfg: ModelConfig) -> "ImageEncoderConfig":
    """The standalone :class:`~mmm.modalities.image.ImageEncoderConfig` of a run's model config."""
    from mmm.modalities.image import ImageEncoderConfig

    i, e = cfg.image, cfg.encoder
    return ImageEncoderConfig(encoder=e, image_size=i.image_size, patch_size=i.patch_size, in_chans=3,
                              cls_token=i.cls_token, position=i.position, embed_norm=i.embed_norm,
                              norm_eps=e.norm_eps, dropout=e.dropout)


def image_encoder_from_checkpoint(contents: CheckpointContents) -> nn.Module:
    """Build the :class:`~mmm.modalities.image.ImageEncoder` of a read checkpoint (eval mode)."""
    from mmm.modalities.image import ImageEncoder

    enc = ImageEncoder.from_config(image_encoder_config(contents.config.model))
    load_weights(enc, contents.modality_state("image"), contents.path)
    return finish_modality_encoder(enc, contents, "image")


# ----------------------------------------------------------------------------- save / load


def save_encoder(encoder: nn.Module, directory: PathLike) -> Path:
    """Write ``mmm_encoder.json``, ``model.safetensors`` and what the encoder needs to read raw input:
    ``tokenizer/`` (text, DNA) or ``audio_frontend.json`` (audio: the fitted front end's config and
    normalisation statistics), when the encoder has one.

    An audio encoder's k-means codebooks are training targets, not part of the encoder, and are not
    saved (they stay in the run's checkpoints and ``audio/`` folder).

    Args:
        encoder: a :class:`TextEncoder` (text or DNA), an :class:`~mmm.modalities.image.ImageEncoder`
            or an :class:`~mmm.modalities.audio.AudioEncoder`.
        directory: output folder, created if needed.

    Returns:
        The folder; :func:`load_encoder` reads it back.
    """
    from safetensors.torch import save_file

    from mmm.modalities.audio import AudioEncoder
    from mmm.modalities.audio_frontend import FRONTEND_FILE
    from mmm.modalities.image import ImageEncoder

    if not isinstance(encoder, (TextEncoder, ImageEncoder, AudioEncoder)):
        raise TypeError(f"save_encoder expects a TextEncoder, an ImageEncoder or an AudioEncoder, "
                        f"got {type(encoder).__name__}")
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cannot save encoder: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(encoder, ImageEncoder):
        meta = {"format": ENCODER_FORMAT, "modality": "image", "model": to_dict(encoder.config)}
    elif isinstance(encoder, AudioEncoder):
        if encoder.frontend is not None and not encoder.frontend.fitted:
            raise ValueError("save_encoder: the audio encoder's front end has no normalisation statistics; fit it "
                             "(AudioFrontend.fit_stats) or detach it (frontend=None) before saving")
        if encoder.frontend is not None and encoder.frontend.token_dim != encoder.embedder.feature_dim:
            raise ValueError(f"save_encoder: the front end gives {encoder.frontend.token_dim} values per token but "
                             f"the encoder expects {encoder.embedder.feature_dim}")
        meta = {"format": ENCODER_FORMAT, "modality": "audio", "model": to_dict(encoder.config),
                "frontend": FRONTEND_FILE if encoder.frontend is not None else None}
    else:
        meta = {"format": ENCODER_FORMAT, "modality": encoder.modality, "model": to_dict(encoder.config),
                "vocab_size": encoder.vocab_size, "pad_id": encoder.pad_id}
    (out / ENCODER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if getattr(encoder, "tokenizer", None) is not None:
        encoder.tokenizer.save(out / TOKENIZER_SUBDIR)
    if isinstance(encoder, AudioEncoder) and encoder.frontend is not None:
        encoder.frontend.save(out)
    return out


def _load_saved_encoder(directory: Path, modality: str) -> nn.Module:
    from safetensors.torch import load_file

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
    if modality == "image":
        from mmm.modalities.image import ImageEncoder, ImageEncoderConfig

        try:
            icfg = from_dict(ImageEncoderConfig, meta["model"], "model")
        except ConfigError as e:
            raise ValueError(f"{meta_path}: {e}") from None
        enc = ImageEncoder.from_config(icfg)
        load_weights(enc, load_file(str(weights)), weights)
        return enc.eval()
    if modality == "audio":
        return _load_saved_audio_encoder(directory, meta, weights)
    for key in ("vocab_size", "pad_id"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    try:
        cfg = from_dict(ModelConfig, meta["model"], "model")
    except ConfigError as e:
        raise ValueError(f"{meta_path}: {e}") from None
    tok_dir = directory / TOKENIZER_SUBDIR
    tok = None
    if tok_dir.is_dir():
        if modality == "dna":
            from mmm.modalities.dna_tokenizer import load_dna_tokenizer

            tok = load_dna_tokenizer(tok_dir)
        else:
            tok = TextTokenizer.load(tok_dir)
    enc = TextEncoder.from_config(cfg, int(meta["vocab_size"]), int(meta["pad_id"]), tok, modality=modality)
    load_weights(enc, load_file(str(weights)), weights)
    return enc.eval()


def _load_saved_audio_encoder(directory: Path, meta: Dict, weights: Path) -> nn.Module:
    from safetensors.torch import load_file

    from mmm.modalities.audio import AudioEncoder, AudioEncoderConfig
    from mmm.modalities.audio_frontend import AudioFrontend

    meta_path = directory / ENCODER_META_FILE
    try:
        acfg = from_dict(AudioEncoderConfig, meta["model"], "model")
    except ConfigError as e:
        raise ValueError(f"{meta_path}: {e}") from None
    frontend = None
    name = meta.get("frontend")
    if name is not None:
        if not isinstance(name, str) or Path(name).name != name:
            raise ValueError(f"{meta_path}: 'frontend' must be a file name in the folder, got {name!r}")
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{meta_path} names the audio front end {name}, but {directory / name} is missing")
        frontend = AudioFrontend.load(directory / name)
        if not frontend.fitted:
            raise ValueError(f"{directory / name}: the audio front end has no normalisation statistics")
        if frontend.token_dim != acfg.feature_dim:
            raise ValueError(f"{directory / name}: the front end gives {frontend.token_dim} values per token but "
                             f"{meta_path} says feature_dim={acfg.feature_dim}")
    enc = AudioEncoder.from_config(acfg, frontend)
    load_weights(enc, load_file(str(weights)), weights)
    return enc.eval()


def load_encoder(source: PathLike, modality: str = "text", *, timm_model: Optional[str] = None,
                 timm_kwargs: Optional[Dict] = None) -> nn.Module:
    """Load a pretrained encoder in eval mode.

    Args:
        source: an mmm ``.ckpt`` file (any run that trained ``modality``), a :func:`save_encoder`
            directory, an HF BERT directory (text), or a timm ViT weights file (image, with
            ``timm_model``).
        modality: which encoder to build: ``text`` or ``dna`` (:class:`TextEncoder` over token ids,
            ``(ids, mask) -> (B, T, H)``, with the tokenizer attached), ``image``
            (:class:`~mmm.modalities.image.ImageEncoder`, ``(B, C, H, W) -> (B, N, D)``, CLS first
            when the model has one) or ``audio`` (:class:`~mmm.modalities.audio.AudioEncoder`,
            ``(B, T, F)`` feature tokens -> ``(B, T, d)``, and ``encode_waveform`` with the fitted
            front end attached).
        timm_model: timm model name of a timm weights file (``.safetensors`` / ``.pth`` / ``.bin``).
        timm_kwargs: extra ``timm.create_model`` arguments for it (e.g. ``{"img_size": 32}``).
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; supported: {list(MODALITIES)}")
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"encoder source {p} does not exist")
    if timm_model is not None or timm_kwargs is not None:
        if modality != "image" or not p.is_file():
            raise ValueError("timm_model/timm_kwargs describe a timm ViT weights file: use them with "
                             "modality='image' and a file path")
        from mmm.interop.timm import load_timm_encoder

        return load_timm_encoder(p, timm_model, timm_kwargs)
    if p.is_file():
        if p.suffix in (".safetensors", ".pth", ".bin") and modality == "image":
            raise ValueError(f"{p} looks like a weights file: for a timm ViT pass timm_model='vit_...' "
                             "(and timm_kwargs if it is not the named model's default size)")
        contents = read_checkpoint(p)
        if modality == "image":
            return image_encoder_from_checkpoint(contents)
        if modality == "audio":
            from mmm.modalities.audio import audio_encoder_from_checkpoint

            return audio_encoder_from_checkpoint(contents)
        return dna_encoder_from_checkpoint(contents) if modality == "dna" else encoder_from_checkpoint(contents)
    if (p / ENCODER_META_FILE).is_file():
        return _load_saved_encoder(p, modality)
    if (p / "config.json").is_file() and modality == "text":
        from mmm.interop.hf import import_hf_bert

        return import_hf_bert(p)
    raise ValueError(f"{p} is a directory but holds neither {ENCODER_META_FILE} (save_encoder) nor, for text, "
                     "config.json (HF BERT); pass a .ckpt file or one of those directories")
