"""Convert between mmm text encoders and HF ``transformers`` BERT (``BertModel`` / ``BertForMaskedLM``).

Weight layout. mmm fuses the query/key/value projections into one ``attn.qkv`` Linear (d → 3d,
rows ordered q | k | v, heads contiguous inside each); HF BERT keeps three Linears
(``attention.self.{query,key,value}``). Everything else maps one to one::

    embedder.tokens / positions / norm      ↔ embeddings.word_embeddings / position_embeddings / LayerNorm
    encoder.blocks.{i}.attn.proj / norm1    ↔ encoder.layer.{i}.attention.output.dense / LayerNorm
    encoder.blocks.{i}.mlp.fc1              ↔ encoder.layer.{i}.intermediate.dense
    encoder.blocks.{i}.mlp.fc2 / norm2      ↔ encoder.layer.{i}.output.dense / LayerNorm
    MLM head dense / norm / bias / weight   ↔ cls.predictions.transform.dense / transform.LayerNorm / bias / decoder

Segments. mmm's segment table (``model.text.segments``, ``embedder.segments``) is HF's
``token_type_embeddings``; mmm derives a token's segment from the ids (the ``[SEP]`` tokens before it in
its sequence), which is the ``token_type_ids`` an HF tokenizer gives a single text or a pair
(:mod:`mmm.modalities.text.embedder`). Export writes the table (a 1-row table as two equal rows); an
encoder without one exports a zero table (2 rows), so HF outputs do not depend on ``token_type_ids``.
Import keeps the table when its rows differ and a tokenizer gives the ``[SEP]`` id. When the rows are
all equal it folds row 0 into the position table, exact for any ``token_type_ids``. Without a tokenizer
it folds row 0 too, exact only for single texts, and says so in a warning.

Pooler. mmm pretrains no pooler (no next-sentence objective), so none is exported:
``BertModel.from_pretrained`` reports ``pooler.dense.{weight,bias}`` as missing and initialises
them randomly, as for any checkpoint without one; use the hidden states, not ``pooler_output``.
Import ignores a pooler and an NSP head (``cls.seq_relationship``).

Only post-LayerNorm models with a GELU MLP, learned absolute positions, an embedding LayerNorm,
QKV biases and no final LayerNorm or relative positions are BERT; anything else is refused by
name. ``transformers`` is needed to export (for ``BertConfig``) and imported lazily; import reads
``config.json`` and the weights directly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from mmm.config import EncoderConfig, ModelConfig, TextConfig
from mmm.checkpoint import CheckpointContents, load_weights, read_checkpoint, safe_torch_load
from mmm.interop.require import require
from mmm.encoders import TextEncoder, encoder_from_checkpoint, load_encoder, read_safetensors
from mmm.modalities.text.tokenizer import META_FILE, TOKENIZER_FILE, VOCAB_FILE, WORDPIECE_SPECIALS, TextTokenizer
from mmm.objectives.mlm import MLMHead

PathLike = Union[str, Path]

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
GELU_ACTS = ("gelu", "gelu_python")  # both exact erf GELU in transformers
_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.", "embeddings.position_ids")
logger = logging.getLogger("mmm.export")


# ----------------------------------------------------------------------------- export


def check_exportable(config: ModelConfig, modality: str = "text") -> None:
    """Raise ValueError naming the first config field HF ``BertModel`` cannot represent.

    Args:
        config: the model configuration of the encoder to export.
        modality: the encoder's modality (its ``modality`` attribute); only ``text`` exports.
    """
    if modality != "text":
        raise ValueError(f"cannot export to HF BERT: this is a {modality!r} encoder; only text encoders export "
                         f"(HF BERT's tokenizers cannot reproduce the {modality} tokenizer); save_encoder keeps it "
                         "in mmm's format")
    e, t = config.encoder, getattr(config, modality)
    rules = [
        ("model.encoder.norm_first", e.norm_first, False, "BERT is post-LayerNorm"),
        ("model.encoder.final_norm", e.final_norm, False, "BERT has no LayerNorm after the last block"),
        ("model.encoder.mlp", e.mlp, "gelu", "BERT's MLP is Linear-GELU-Linear (no gated units)"),
        ("model.encoder.relative_position", e.relative_position, "none", "BERT has no ALiBi/rotary positions"),
        ("model.encoder.qkv_bias", e.qkv_bias, True, "BERT's query/key/value projections have biases"),
        ("model.text.position", t.position, "learned", "BERT uses a learned absolute position table"),
        ("model.text.embed_norm", t.embed_norm, True, "BERT normalises the embedding sum"),
    ]
    for name, value, needed, why in rules:
        if value != needed:
            raise ValueError(f"cannot export to HF BERT: {name}={value!r} is not representable "
                             f"({why}; it needs {name}={needed!r})")


def _token_type_table(sd: Dict[str, torch.Tensor], dim: int) -> torch.Tensor:
    """HF's ``token_type_embeddings`` for an mmm state_dict: its segment table (a single row twice, so a pair's
    token type 1 gets what mmm gives it), or zeros (2 rows) without one."""
    table = sd.get("embedder.segments.weight")
    if table is None:
        return torch.zeros(2, dim, dtype=sd["embedder.tokens.weight"].dtype)
    return table.expand(2, -1) if table.shape[0] == 1 else table


def _encoder_tensors(enc: TextEncoder) -> Dict[str, torch.Tensor]:
    """mmm encoder weights in HF ``BertModel`` key layout (no prefix)."""
    sd = enc.state_dict()
    d = enc.hidden_size
    out = {
        "embeddings.word_embeddings.weight": sd["embedder.tokens.weight"],
        "embeddings.position_embeddings.weight": sd["embedder.positions.weight"],
        "embeddings.token_type_embeddings.weight": _token_type_table(sd, d),
        "embeddings.LayerNorm.weight": sd["embedder.norm.weight"],
        "embeddings.LayerNorm.bias": sd["embedder.norm.bias"],
    }
    for i in range(enc.config.encoder.depth):
        src, dst = f"encoder.blocks.{i}.", f"encoder.layer.{i}."
        for part, (w, b) in zip(("query", "key", "value"),
                                zip(sd[src + "attn.qkv.weight"].split(d, 0), sd[src + "attn.qkv.bias"].split(d, 0))):
            out[f"{dst}attention.self.{part}.weight"] = w
            out[f"{dst}attention.self.{part}.bias"] = b
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
                             ("norm2", "output.LayerNorm")):
            out[f"{dst}{theirs}.weight"] = sd[f"{src}{ours}.weight"]
            out[f"{dst}{theirs}.bias"] = sd[f"{src}{ours}.bias"]
    return out


def _head_tensors(head: MLMHead) -> Dict[str, torch.Tensor]:
    return {
        "cls.predictions.transform.dense.weight": head.dense.weight,
        "cls.predictions.transform.dense.bias": head.dense.bias,
        "cls.predictions.transform.LayerNorm.weight": head.norm.weight,
        "cls.predictions.transform.LayerNorm.bias": head.norm.bias,
        "cls.predictions.bias": head.bias,
        "cls.predictions.decoder.weight": head.weight,
        # HF ties decoder.bias to predictions.bias only when it ties the decoder weight; write both.
        "cls.predictions.decoder.bias": head.bias,
    }


def head_from_checkpoint(state_dict: Dict[str, torch.Tensor], encoder: TextEncoder, source: PathLike,
                         name: str = "mlm") -> Optional[MLMHead]:
    """The MLM head stored in an mmm checkpoint's state_dict (tied to ``encoder``'s token table), or None.

    Args:
        state_dict: checkpoint weights without the ``model.`` prefix.
        encoder: the encoder built from the same checkpoint.
        source: the checkpoint file (for messages).
        name: the head's name in the model: the MLM objective's ``label``, else ``mlm``
            (:func:`text_mlm_head_name` finds it in a checkpoint's config).
    """
    prefix = f"objectives.{name}.head."
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sub:
        return None
    tied = "decoder_weight" not in sub
    head = MLMHead(encoder.hidden_size, encoder.vocab_size, encoder.config.encoder.norm_eps,
                   encoder.embedder.tokens if tied else None)
    load_weights(head, sub, source)
    return head.eval()


def text_mlm_head_name(contents: CheckpointContents) -> Tuple[Optional[str], List[str]]:
    """The name of the checkpoint's text MLM head (objective ``mlm`` on ``text``, named by its
    ``label``, else ``mlm``), or None; and notes on the choice. With several, the first listed in
    ``objectives`` is taken; a head trained on a DrBERT decoder's output (``decoder_layers > 0``) or on
    LXMERT's cross-modality layers (``two_stream`` layout) is not taken, as HF BERT has neither."""
    from mmm.model import head_name

    heads = [o for o in contents.config.objectives if o.name == "mlm" and o.args.get("modality", "text") == "text"]
    if not heads:
        return None, []
    chosen, notes = heads[0], []
    name = head_name(chosen)
    if len(heads) > 1:
        notes.append(f"{contents.path} has {len(heads)} text MLM heads {[head_name(o) for o in heads]}; exporting "
                     f"the first listed in objectives, {name!r} (pass mlm_head= to choose another)")
    layers = chosen.args.get("decoder_layers", 0)
    if layers:
        notes.append(f"the MLM head {name!r} of {contents.path} was trained on the output of a {layers}-layer "
                     f"DrBERT decoder (decoder_layers={layers}), which HF BERT has no equivalent of: exporting "
                     "the encoder as BertModel, without the head")
        return None, notes
    if contents.config.model.image_text.layout == "two_stream":
        cross = contents.config.model.image_text.cross_layers
        notes.append(f"the MLM head {name!r} of {contents.path} was trained on the output of {cross} LXMERT "
                     f"cross-modality layer(s) (model.image_text.layout: two_stream), which HF BERT has no "
                     f"equivalent of: exporting the text encoder as BertModel, without the head")
        return None, notes
    return name, notes


def _tokenizer_config(tok: TextTokenizer, max_len: int) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {
        "tokenizer_class": "BertTokenizer" if tok.kind == "wordpiece" else "PreTrainedTokenizerFast",
        "do_lower_case": tok.lowercase,
        "model_max_length": max_len,
        "padding_side": "right",
    }
    cfg.update({f"{role}_token": token for role, token in tok.roles.items()})
    return cfg


def export_hf_bert(encoder_or_ckpt: Union[TextEncoder, PathLike], out_dir: PathLike, *,
                   mlm_head: Optional[MLMHead] = None) -> Path:
    """Write an HF BERT directory: ``config.json``, ``model.safetensors`` and the tokenizer files.

    With an MLM head (given, or the checkpoint's text MLM head: :func:`text_mlm_head_name`) the
    layout is ``BertForMaskedLM`` (``bert.``-prefixed encoder keys + ``cls.predictions.*``); without
    one it is ``BertModel`` (bare keys). Either loads with ``BertModel.from_pretrained`` and
    ``AutoModel``. Why a checkpoint's head was left out, or which of several was taken, is logged
    (``mmm.export``, warning).

    Args:
        encoder_or_ckpt: a text :class:`~mmm.encoders.TextEncoder`, an mmm ``.ckpt`` file, or any
            directory :func:`~mmm.encoders.load_encoder` reads.
        out_dir: output folder, created if needed.
        mlm_head: an :class:`~mmm.objectives.mlm.MLMHead` to export with the encoder; overrides
            the checkpoint's own head.

    Returns:
        The output folder.
    """
    out, notes = _export(encoder_or_ckpt, out_dir, mlm_head)
    for note in notes:
        logger.warning(note)
    return out


def _export(encoder_or_ckpt: Union[TextEncoder, PathLike], out_dir: PathLike,
            mlm_head: Optional[MLMHead]) -> Tuple[Path, List[str]]:
    """:func:`export_hf_bert`, returning the notes on the head instead of logging them."""
    transformers = require("transformers", "exporting to HF BERT")
    from safetensors.torch import save_file

    notes: List[str] = []
    if isinstance(encoder_or_ckpt, TextEncoder):
        enc = encoder_or_ckpt
    elif isinstance(encoder_or_ckpt, nn.Module):
        raise TypeError(f"export_hf_bert needs a text encoder (TextEncoder), got {type(encoder_or_ckpt).__name__}")
    else:
        src = Path(encoder_or_ckpt)
        if src.is_file():
            contents = read_checkpoint(src)
            enc = encoder_from_checkpoint(contents)
            if mlm_head is None:
                name, notes = text_mlm_head_name(contents)
                if name is not None:
                    mlm_head = head_from_checkpoint(contents.state_dict, enc, src, name)
        else:
            enc = load_encoder(src)
            if not isinstance(enc, TextEncoder):
                raise TypeError(f"{src}: export_hf_bert needs a text encoder, got {type(enc).__name__}")
    check_exportable(enc.config, getattr(enc, "modality", "text"))
    if mlm_head is not None:
        if not isinstance(mlm_head, MLMHead):
            raise TypeError(f"mlm_head must be an mmm MLMHead, got {type(mlm_head).__name__}")
        if tuple(mlm_head.weight.shape) != (enc.vocab_size, enc.hidden_size):
            raise ValueError(f"mlm_head projects to {tuple(mlm_head.weight.shape)}, the encoder has vocab "
                             f"{enc.vocab_size} and width {enc.hidden_size}")

    e, t = enc.config.encoder, enc.config.text
    tied = mlm_head is not None and mlm_head.weight is enc.embedder.tokens.weight
    if mlm_head is not None and not tied and mlm_head.tied_embedding is not None:
        raise ValueError("mlm_head is tied to a different embedding table than the encoder's token embedding")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cannot export: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    config = transformers.BertConfig(
        vocab_size=enc.vocab_size, hidden_size=e.dim, num_hidden_layers=e.depth, num_attention_heads=e.heads,
        intermediate_size=e.mlp_hidden or 4 * e.dim, hidden_act="gelu", hidden_dropout_prob=e.dropout,
        attention_probs_dropout_prob=e.attn_dropout, max_position_embeddings=t.max_len,
        type_vocab_size=max(2, getattr(t, "segments", 0)),
        initializer_range=enc.config.init_std, layer_norm_eps=e.norm_eps, pad_token_id=enc.pad_id,
        tie_word_embeddings=(mlm_head is None or tied),
        architectures=["BertForMaskedLM" if mlm_head is not None else "BertModel"],
    )
    config.save_pretrained(str(out))

    tensors = _encoder_tensors(enc)
    if mlm_head is not None:
        tensors = {f"bert.{k}": v for k, v in tensors.items()}
        tensors.update(_head_tensors(mlm_head))
    # safetensors refuses shared storage (the tied decoder, split qkv views): write independent copies.
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})

    if enc.tokenizer is not None:
        enc.tokenizer.save(out)  # tokenizer.json (fast tokenizer), mmm_tokenizer.json, vocab.txt (WordPiece)
        (out / TOKENIZER_CONFIG_FILE).write_text(
            json.dumps(_tokenizer_config(enc.tokenizer, t.max_len), indent=2) + "\n", encoding="utf-8")
    return out, notes


def export_command(ckpt: PathLike, out_dir: PathLike) -> Path:
    """``mmm export hf CKPT OUT``: export a pretraining checkpoint (with its text MLM head) to HF BERT;
    prints the notes on the head (:func:`text_mlm_head_name`) and what was written.

    Args:
        ckpt: an mmm ``.ckpt`` file (or a saved-encoder directory).
        out_dir: output folder.
    """
    out, notes = _export(ckpt, out_dir, None)
    for note in notes:
        print(f"note: {note}")
    arch = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))["architectures"][0]
    print(f"exported {ckpt} to {out} as {arch}; load it with transformers.AutoModel.from_pretrained({str(out)!r})")
    return out


# ----------------------------------------------------------------------------- import


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_bin(path: Path) -> Dict[str, torch.Tensor]:
    tensors = safe_torch_load(path)
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path}: expected a mapping of weight names to tensors")
    return tensors


def _read_hf_weights(directory: Path) -> Tuple[Dict[str, torch.Tensor], Path]:
    """All tensors of an HF model directory (single file or sharded), and the file they came from."""
    single = directory / SAFETENSORS_FILE
    if single.is_file():
        return read_safetensors(single), single
    for index_name, loader in ((SAFETENSORS_FILE + ".index.json", read_safetensors),
                               (BIN_FILE + ".index.json", _load_bin)):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: missing 'weight_map'")
            tensors: Dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = directory / shard
                if Path(shard).name != shard or not shard_path.is_file():
                    raise FileNotFoundError(f"{index}: shard {shard!r} is missing from {directory}")
                tensors.update(loader(shard_path))
            return tensors, index
    binary = directory / BIN_FILE
    if binary.is_file():
        return _load_bin(binary), binary
    raise FileNotFoundError(f"{directory} holds no weights: expected {SAFETENSORS_FILE}, {BIN_FILE} or a sharded index")


def _normalise_keys(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip the ``bert.`` prefix and rename old ``gamma``/``beta`` LayerNorm names."""
    out = {}
    for k, v in tensors.items():
        if k.startswith("bert."):
            k = k[len("bert."):]
        if k.endswith(".gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out


def _wordpiece_from_vocab(directory: Path) -> TextTokenizer:
    """A BERT WordPiece tokenizer from ``vocab.txt`` (+ ``do_lower_case`` in ``tokenizer_config.json``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab_path = directory / VOCAB_FILE
    vocab: Dict[str, int] = {}
    for i, line in enumerate(vocab_path.read_text(encoding="utf-8").split("\n")):
        token = line.rstrip("\r")
        if token == "" and i > 0:
            continue  # trailing newline
        vocab[token] = i
    lowercase, strip_accents = True, None
    cfg_path = directory / TOKENIZER_CONFIG_FILE
    if cfg_path.is_file():
        tcfg = _read_json(cfg_path)
        lowercase = bool(tcfg.get("do_lower_case", True))
        strip_accents = tcfg.get("strip_accents")
    missing = [tok for tok in WORDPIECE_SPECIALS.values() if tok not in vocab]
    if missing:
        raise ValueError(f"{vocab_path}: BERT special tokens {missing} are missing from the vocabulary")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=WORDPIECE_SPECIALS["unk"], continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_t, sep_t = WORDPIECE_SPECIALS["cls"], WORDPIECE_SPECIALS["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls_t} $A {sep_t}", pair=f"{cls_t} $A {sep_t} $B:1 {sep_t}:1",
        special_tokens=[(cls_t, vocab[cls_t]), (sep_t, vocab[sep_t])])
    tok.add_special_tokens(list(WORDPIECE_SPECIALS.values()))  # never split or normalised
    return TextTokenizer(tok, WORDPIECE_SPECIALS, lowercase, "wordpiece")


def _fast_tokenizer(directory: Path) -> TextTokenizer:
    """An HF fast tokenizer's ``tokenizer.json`` (WordPiece or BPE) as a :class:`TextTokenizer`; the special
    tokens' roles come from ``tokenizer_config.json`` / ``special_tokens_map.json``, else BERT's names."""
    from tokenizers import Tokenizer

    path = directory / TOKENIZER_FILE
    try:
        raw = _read_json(path)
        tok = Tokenizer.from_file(str(path))
    except Exception as exn:  # the Rust side raises a plain Exception on a file it cannot read
        raise ValueError(f"{path}: not a readable HF tokenizer.json: {exn}") from None
    model = str((raw.get("model") or {}).get("type", ""))
    kind = {"WordPiece": "wordpiece", "BPE": "bpe"}.get(model)
    if kind is None:
        raise ValueError(f"{path}: a {model or 'model-less'} tokenizer; mmm's text tokenizers are WordPiece or BPE")
    given: Dict[str, Any] = {}
    for name in ("special_tokens_map.json", TOKENIZER_CONFIG_FILE):  # the later one wins
        if (directory / name).is_file():
            given.update(_read_json(directory / name))
    roles = {}
    for role in ("pad", "unk", "cls", "sep", "mask"):
        value = given.get(f"{role}_token", WORDPIECE_SPECIALS[role])
        roles[role] = value.get("content") if isinstance(value, dict) else value
    normalizer = raw.get("normalizer") or {}
    lowercase = bool(given.get("do_lower_case", normalizer.get("lowercase", False)))
    try:
        return TextTokenizer(tok, roles, lowercase, kind)
    except ValueError as exn:
        raise ValueError(f"{path}: {exn} (the special tokens come from {TOKENIZER_CONFIG_FILE} or "
                         f"special_tokens_map.json, else BERT's [PAD] [UNK] [CLS] [SEP] [MASK])") from None


def _hf_tokenizer(directory: Path) -> Optional[TextTokenizer]:
    if (directory / META_FILE).is_file() and (directory / TOKENIZER_FILE).is_file():
        return TextTokenizer.load(directory)  # written by export_hf_bert: exact round trip
    if (directory / VOCAB_FILE).is_file():
        return _wordpiece_from_vocab(directory)
    if (directory / TOKENIZER_FILE).is_file():  # a fast tokenizer alone (many Hub folders)
        try:
            return _fast_tokenizer(directory)
        except ValueError as exn:  # e.g. a Unigram model: the encoder still loads, for token ids
            logger.warning("%s; loading the encoder without a tokenizer (it takes token ids)", exn)
    return None


def _model_config(cfg: Dict[str, Any], path: Path, lowercase: bool, segments: int = 0) -> ModelConfig:
    if cfg.get("model_type") != "bert":
        raise ValueError(f"{path}: model_type is {cfg.get('model_type')!r}; only 'bert' checkpoints can be imported")
    act = cfg.get("hidden_act", "gelu")
    if act not in GELU_ACTS:
        raise ValueError(f"{path}: hidden_act={act!r} is not supported; mmm's MLP uses exact GELU ({GELU_ACTS})")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"{path}: position_embedding_type={pos!r} is not supported; only 'absolute'")
    if cfg.get("is_decoder", False):
        raise ValueError(f"{path}: is_decoder=true (causal attention) is not supported; mmm encoders are bidirectional")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings")
    missing = [k for k in required if not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"{path}: missing or non-integer keys {missing}")
    enc = EncoderConfig(
        dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
        mlp_hidden=cfg["intermediate_size"], mlp="gelu", norm_first=False, final_norm=False,
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), qkv_bias=True,
        dropout=float(cfg.get("hidden_dropout_prob", 0.1)), attn_dropout=float(cfg.get("attention_probs_dropout_prob", 0.1)),
        relative_position="none", attention="auto")
    text = TextConfig(tokenizer="wordpiece", vocab_size=cfg["vocab_size"], lowercase=lowercase,
                      max_len=cfg["max_position_embeddings"], position="learned", embed_norm=True, segments=segments)
    return ModelConfig(encoder=enc, text=text, init_std=float(cfg.get("initializer_range", 0.02)))


def _encoder_state(hf: Dict[str, torch.Tensor], depth: int, source: Path, segments: bool) -> Dict[str, torch.Tensor]:
    """HF BERT tensors (normalised keys) → mmm TextEncoder state_dict: the token type table as the segment table
    (``segments``), else its row 0 folded into the positions."""
    used: List[str] = []

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise ValueError(f"{source}: weight {key!r} is missing (not a BERT checkpoint, or a truncated one)")
        used.append(key)
        return hf[key].to(torch.float32)

    positions = take("embeddings.position_embeddings.weight")
    state = {"embedder.tokens.weight": take("embeddings.word_embeddings.weight")}
    if segments:
        state["embedder.segments.weight"] = take("embeddings.token_type_embeddings.weight")
    elif "embeddings.token_type_embeddings.weight" in hf:
        positions = positions + take("embeddings.token_type_embeddings.weight")[0]
    state.update({
        "embedder.positions.weight": positions,
        "embedder.norm.weight": take("embeddings.LayerNorm.weight"),
        "embedder.norm.bias": take("embeddings.LayerNorm.bias"),
    })
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"encoder.blocks.{i}."
        state[dst + "attn.qkv.weight"] = torch.cat([take(f"{src}attention.self.{p}.weight") for p in ("query", "key", "value")])
        state[dst + "attn.qkv.bias"] = torch.cat([take(f"{src}attention.self.{p}.bias") for p in ("query", "key", "value")])
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
                             ("norm2", "output.LayerNorm")):
            state[f"{dst}{ours}.weight"] = take(f"{src}{theirs}.weight")
            state[f"{dst}{ours}.bias"] = take(f"{src}{theirs}.bias")
    leftover = sorted(k for k in set(hf) - set(used)
                      if not k.startswith(_IGNORED_PREFIXES) and not k.startswith("cls.predictions."))
    if leftover:
        raise ValueError(f"{source}: unexpected weights for a {depth}-layer BERT: {leftover[:8]}"
                         f"{' ...' if len(leftover) > 8 else ''}")
    return state


def _import(directory: PathLike) -> Tuple[TextEncoder, Dict[str, torch.Tensor], Path, Dict[str, Any]]:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"HF model directory {d} does not exist or is not a directory")
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing; an HF BERT directory needs config.json and weights")
    cfg = _read_json(cfg_path)
    tok = _hf_tokenizer(d)
    hf, source = _read_hf_weights(d)
    hf = _normalise_keys(hf)
    types = hf.get("embeddings.token_type_embeddings.weight")
    distinct = types is not None and types.shape[0] > 1 and not bool((types == types[:1]).all())
    if distinct and tok is None:
        logger.warning("%s: no tokenizer gives the [SEP] id that starts a pair's second segment, so only row 0 of "
                       "token_type_embeddings is imported: exact for single texts, not for pairs "
                       "(token_type_ids 1)", source)
    segments = int(types.shape[0]) if distinct and tok is not None else 0
    model_cfg = _model_config(cfg, cfg_path, tok.lowercase if tok is not None else True, segments)
    state = _encoder_state(hf, model_cfg.encoder.depth, source, bool(segments))
    vocab = int(state["embedder.tokens.weight"].shape[0])
    if vocab != model_cfg.text.vocab_size:
        raise ValueError(f"{source}: word_embeddings has {vocab} rows but {cfg_path} says vocab_size={model_cfg.text.vocab_size}")
    if tok is not None and tok.vocab_size > vocab:
        raise ValueError(f"{d}: the tokenizer has {tok.vocab_size} ids but the model's token table only {vocab}")
    pad_id = cfg.get("pad_token_id")
    pad_id = int(pad_id) if isinstance(pad_id, int) else (tok.pad_id if tok is not None else 0)
    enc = TextEncoder.from_config(model_cfg, vocab, pad_id, tok)
    load_weights(enc, state, source)
    return enc.eval(), hf, source, cfg


def import_hf_bert(directory: PathLike) -> TextEncoder:
    """Build a :class:`~mmm.encoders.TextEncoder` (eval mode) from an HF BERT directory.

    Accepts ``BertModel`` and ``BertForMaskedLM``/``BertForPreTraining`` layouts (``bert.``-prefixed
    or bare keys) from ``model.safetensors``, ``pytorch_model.bin`` (``weights_only=True``) or a
    sharded index. The tokenizer comes from files written by :func:`export_hf_bert`, else from
    ``vocab.txt`` (BERT WordPiece, ``do_lower_case`` from ``tokenizer_config.json``, default
    true), else from a fast tokenizer's ``tokenizer.json`` (WordPiece or BPE), else it is None (with a
    warning when a ``tokenizer.json`` cannot be read as one of those).

    Args:
        directory: the model folder.
    """
    return _import(directory)[0]


def import_hf_bert_mlm(directory: PathLike) -> Tuple[TextEncoder, MLMHead]:
    """:func:`import_hf_bert` plus the ``cls.predictions`` MLM head as an mmm :class:`MLMHead`.

    As transformers (5.x) reads the folder: the head is tied to the encoder's token table when the
    checkpoint has no separate decoder weight, or ``tie_word_embeddings`` is true (HF's default) and
    the stored decoder weight equals the table; its bias is ``cls.predictions.decoder.bias`` when
    stored (what the forward adds), else ``cls.predictions.bias``.

    Args:
        directory: a ``BertForMaskedLM`` (or ``BertForPreTraining``) folder.
    """
    enc, hf, source, cfg = _import(directory)
    keys = ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias")
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ValueError(f"{source}: no MLM head (missing {missing}); import_hf_bert loads the encoder alone")
    decoder = hf.get("cls.predictions.decoder.weight")
    # as transformers 5 loads it: a decoder weight stored apart from the token table is used unless
    # tie_word_embeddings is true and it equals the table (a tie with a different stored value is not made)
    tied = decoder is None or (bool(cfg.get("tie_word_embeddings", True))
                               and torch.equal(decoder, hf["embeddings.word_embeddings.weight"]))
    head = MLMHead(enc.hidden_size, enc.vocab_size, enc.config.encoder.norm_eps, enc.embedder.tokens if tied else None)
    # the forward adds cls.predictions.decoder.bias; predictions.bias is only its tie source (untied
    # transformers 5 heads train decoder.bias alone), so the decoder's own bias wins when stored
    bias = hf.get("cls.predictions.decoder.bias", hf.get("cls.predictions.bias"))
    if bias is None:
        raise ValueError(f"{source}: the MLM head has no output bias (cls.predictions.decoder.bias or "
                         "cls.predictions.bias)")
    state = {"dense.weight": hf[keys[0]], "dense.bias": hf[keys[1]], "norm.weight": hf[keys[2]],
             "norm.bias": hf[keys[3]], "bias": bias}
    if tied:
        state["tied_embedding.weight"] = enc.embedder.tokens.weight.detach().clone()
    else:
        state["decoder_weight"] = decoder
    load_weights(head, {k: v.to(torch.float32) for k, v in state.items()}, source)
    return enc, head.eval()


__all__ = ["check_exportable", "export_command", "export_hf_bert", "head_from_checkpoint", "import_hf_bert",
           "import_hf_bert_mlm", "text_mlm_head_name"]
