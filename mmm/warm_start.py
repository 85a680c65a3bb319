"""Warm start (``model.init_from``): initialise a model from pretrained weights before training.

Continued pretraining, a CLM → MLM switch, or an ELECTRA discriminator started from an MLM
encoder all begin from weights another run produced. :func:`warm_start` reads three sources:

* an mmm pretraining checkpoint (``.ckpt``): every tensor of its model, heads included, under
  the same names;
* a folder written by :func:`~mmm.encoders.save_encoder`: its embedder and encoder, placed
  under ``embedders.<its modality>`` and ``encoder``;
* an HF BERT folder (``config.json`` + weights): the encoder as ``embedders.text`` + ``encoder``,
  and its ``cls.predictions`` head as the model's text MLM head when it has one (``objectives.mlm.head``,
  or ``objectives.<label>.head`` for an MLM objective with a ``label``; with several, the first).

Tensors are matched by name. Each target tensor is *loaded* (the source has it, same shape),
*newly initialised* (the source lacks it; it keeps the builder's initialisation), and each source
tensor the model lacks is *ignored*; the three lists are printed. A tensor both have with
different shapes is an error naming it and both shapes -- nothing is loaded silently cut or padded.
"""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

PathLike = Union[str, Path]


class WarmStartError(ValueError):
    """The warm-start source cannot initialise this model (unreadable, or a tensor's shape differs)."""


@dataclass
class WarmStartReport:
    """What :func:`warm_start` did, tensor by tensor (full state-dict names of the target model).

    Args:
        source: the file or folder read.
        kind: ``checkpoint``, ``encoder`` or ``hf_bert``.
        loaded: target tensors set from the source.
        initialised: target tensors the source does not have (left as the builder initialised them).
        ignored: source tensors the target does not have.
    """

    source: Path
    kind: str
    loaded: List[str] = field(default_factory=list)
    initialised: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """Readable text: counts, then the names with layer indices folded (``encoder.blocks.*.mlp.fc1.weight x4``)."""
        lines = [f"init_from {self.source} ({self.kind}): {len(self.loaded)} tensors loaded, "
                 f"{len(self.initialised)} newly initialised, {len(self.ignored)} ignored"]
        for title, names in (("loaded", self.loaded), ("newly initialised", self.initialised),
                             ("ignored (not in this model)", self.ignored)):
            if names:
                lines.append(f"  {title}:")
                lines.extend(f"    {name}" for name in fold_names(names))
        return "\n".join(lines)


def fold_names(names: List[str]) -> List[str]:
    """Tensor names with numeric path parts replaced by ``*``, each pattern once with its count."""
    counts = Counter(re.sub(r"(?<=\.)\d+(?=\.)", "*", n) for n in names)
    return [p if c == 1 else f"{p} x{c}" for p, c in sorted(counts.items())]


def read_source(source: PathLike) -> Tuple[Dict[str, torch.Tensor], str]:
    """The source's tensors keyed like a :class:`~mmm.model.MaskedModel` state dict, and its kind.

    Args:
        source: an mmm ``.ckpt``, a :func:`~mmm.encoders.save_encoder` folder or an HF BERT folder.
    """
    state, kind, _, _ = _read(source)
    return state, kind


def _saved_encoder_modality(p: Path) -> str:
    """The modality a :func:`~mmm.encoders.save_encoder` folder's metadata names (text when it names none)."""
    from mmm.encoders import ENCODER_META_FILE

    meta = json.loads((p / ENCODER_META_FILE).read_text(encoding="utf-8"))
    return (meta.get("modality") if isinstance(meta, dict) else None) or "text"


def _read(source: PathLike) -> Tuple[Dict[str, torch.Tensor], str, object, Optional[List[str]]]:
    """:func:`read_source`, plus the :class:`~mmm.config.EncoderConfig` the source's encoder was built with
    (a checkpoint's config, a saved encoder's or an HF BERT's, as mmm reads it) and a checkpoint's modality order
    (None for the other sources): the source is read once."""
    from mmm.encoders import ENCODER_META_FILE, load_encoder, read_checkpoint

    p = Path(source)
    if not p.exists():
        raise WarmStartError(f"model.init_from: {p} does not exist")
    try:
        if p.is_file():
            contents = read_checkpoint(p)
            return dict(contents.state_dict), "checkpoint", contents.config.model.encoder, contents.modality_order
        if (p / ENCODER_META_FILE).is_file():
            modality = _saved_encoder_modality(p)
            enc = load_encoder(p, modality=modality)
            return _place_encoder(enc.state_dict(), modality), "encoder", enc.encoder.cfg, None
        if (p / "config.json").is_file():
            from mmm.interop.hf import import_hf_bert, import_hf_bert_mlm

            try:
                enc, head = import_hf_bert_mlm(p)
            except ValueError as e:
                if "no MLM head" not in str(e):
                    raise
                enc, head = import_hf_bert(p), None
            state = _place_encoder(enc.state_dict(), "text")
            if head is not None:
                state.update({f"objectives.mlm.head.{k}": v for k, v in head.state_dict().items()})
            return state, "hf_bert", enc.encoder.cfg, None
    except (ValueError, FileNotFoundError, OSError) as e:
        raise WarmStartError(f"model.init_from: cannot read {p}: {e}") from None
    raise WarmStartError(f"model.init_from: {p} is a folder but holds neither {ENCODER_META_FILE} (a saved encoder) "
                         f"nor config.json (an HF BERT model); pass one of those or an mmm .ckpt file")


SAME_SHAPES_OTHER_FUNCTION = ("norm_first", "mlp", "relative_position", "heads")
"""Encoder settings that change what the weights compute but not their shapes (``mlp``: geglu and swiglu;
``heads``: the fused QKV projection is (3d, d) whatever the head count)."""


def _check_same_function(model: nn.Module, source: PathLike, theirs: object) -> None:
    """Refuse a source whose encoder (built with ``theirs``) computes otherwise with the same tensor shapes (a
    pre-LN source loaded into a post-LN model loads every tensor and computes something else)."""
    ours = getattr(getattr(model, "encoder", None), "cfg", None)
    if ours is None or theirs is None:
        return
    diffs = [f"{k} is {getattr(theirs, k)!r} there but {getattr(ours, k)!r} here" for k in SAME_SHAPES_OTHER_FUNCTION
             if getattr(theirs, k, None) != getattr(ours, k, None)]
    if diffs:
        raise WarmStartError(f"model.init_from {source}: its encoder computes differently with the same tensor shapes "
                             f"({'; '.join(diffs)}); the loaded weights would not compute what they were trained to. "
                             f"Set model.encoder to the source's values")


def _place_encoder(state: Dict[str, torch.Tensor], modality: str) -> Dict[str, torch.Tensor]:
    """A standalone encoder's ``embedder.*`` / ``encoder.*`` names as a model's ``embedders.<modality>.*`` / ``encoder.*``."""
    out = {}
    for k, v in state.items():
        if k.startswith("embedder."):
            out[f"embedders.{modality}.{k[len('embedder.'):]}"] = v
        else:
            out[k] = v
    return out


def _onto_text_mlm_head(model: nn.Module, src: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An HF head read as ``objectives.mlm.head.*``, renamed to the model's text MLM head when that one is
    labelled (e.g. ``mlm_text`` in a multimodal run); with several text MLM heads, the first."""
    prefix = "objectives.mlm.head."
    objectives = getattr(model, "objectives", None)
    if objectives is None or not any(k.startswith(prefix) for k in src):
        return src
    from mmm.objectives.mlm import MaskedLanguageModeling

    names = [n for n, o in objectives.items() if isinstance(o, MaskedLanguageModeling) and o.modality == "text"]
    if not names or "mlm" in names:
        return src
    target = f"objectives.{names[0]}.head."
    return {(target + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in src.items()}


MODALITY_ROWS = "modality_embed.weight"
EXPERTS = ".mlp.experts."


def by_modality(src: Dict[str, torch.Tensor], source_order: List[str], target_order: List[str],
                own: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The source's per-modality tensors renumbered by modality name for a model whose modalities come in
    another order (a multi-task run numbers them by the order of its ``tasks``).

    The modality-embedding rows and the modality experts (``encoder.blocks.*.mlp.experts.<i>``) are indexed by
    place: loaded by name alone, a text token would get the source's DNA vector and DNA expert. A target modality
    the source lacks keeps its initialised row and its experts stay initialised; a source modality the target lacks
    is ignored.

    Args:
        src: the source's tensors (model state-dict names).
        source_order: the source's modalities, in its order (``checkpoint["mmm"]["modalities"]``).
        target_order: the target model's modalities, in its order.
        own: the target model's state dict (the rows it keeps).
    """
    out = {}
    for key, value in src.items():
        if key == MODALITY_ROWS and key in own and value.shape[1:] == own[key].shape[1:]:  # else the shape check names it
            rows = own[key].detach().clone()
            for j, name in enumerate(target_order):
                if name in source_order and j < rows.shape[0] and source_order.index(name) < value.shape[0]:
                    rows[j] = value[source_order.index(name)]
            out[key] = rows
        elif key.startswith("encoder.") and EXPERTS in key:
            head, tail = key.split(EXPERTS, 1)
            index, rest = tail.split(".", 1)
            name = source_order[int(index)] if int(index) < len(source_order) else None
            if name in target_order:
                out[f"{head}{EXPERTS}{target_order.index(name)}.{rest}"] = value
            else:
                out[f"{head}{EXPERTS}{name or index}-not-in-this-model.{rest}"] = value  # reported as ignored
        else:
            out[key] = value
    return out


def warm_start(model: nn.Module, source: PathLike, verbose: bool = True) -> WarmStartReport:
    """Initialise ``model`` from the tensors of ``source`` that it has, by name.

    Args:
        model: the freshly built model (a :class:`~mmm.model.MaskedModel`).
        source: an mmm ``.ckpt``, a saved encoder folder or an HF BERT folder.
        verbose: print the report.

    Raises:
        WarmStartError: the source is unreadable, or a tensor both have differs in shape (the message
            names it and both shapes).
    """
    src, kind, source_encoder, source_order = _read(source)
    if kind == "hf_bert":
        src = _onto_text_mlm_head(model, src)
    own = model.state_dict()
    target_order = list(getattr(model, "modality_ids", {}))
    if source_order and target_order and list(source_order) != target_order:
        src = by_modality(src, list(source_order), target_order, own)
    mismatched = [(k, tuple(src[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in src and tuple(src[k].shape) != tuple(v.shape)]
    if mismatched:
        name, theirs, ours = mismatched[0]
        more = f" (and {len(mismatched) - 1} more: {[m[0] for m in mismatched[1:4]]})" if len(mismatched) > 1 else ""
        raise WarmStartError(f"model.init_from {source}: tensor {name!r} has shape {theirs} there but {ours} in this "
                             f"model{more}; make the model's sizes (vocabulary, width, depth, max_len) match the source")
    _check_same_function(model, source, source_encoder)  # after the shapes: a gelu source into a geglu model differs in shape
    folded = _fold_segment_row_0(src, own)
    report = WarmStartReport(Path(source), kind, sorted(k for k in own if k in src),
                             sorted(k for k in own if k not in src), sorted(k for k in src if k not in own))
    loaded = {k: src[k] for k in report.loaded}
    zeroed = _zero_new_segment_tables(own, src, report.initialised, loaded)
    # strict=False: the tensors the source lacks keep their initialisation
    result = model.load_state_dict(loaded, strict=False)
    if result.unexpected_keys:  # cannot happen: only the model's own names are passed
        raise WarmStartError(f"model.init_from {source}: unexpected keys {result.unexpected_keys[:8]}")
    if verbose:
        print(report.summary(), flush=True)
        for table, into in folded:
            print(f"init_from: {table} (segments) is not in this model; its row 0 is added to {into}, which is exact "
                  f"for single texts (set model.text.segments to keep the table)", flush=True)
        for table in zeroed:
            print(f"init_from: the source has no {table} (segments): it starts at zero, so the model computes the "
                  f"source's function", flush=True)
    return report


def _zero_new_segment_tables(own: Dict[str, torch.Tensor], src: Dict[str, torch.Tensor], initialised: List[str],
                             loaded: Dict[str, torch.Tensor]) -> List[str]:
    """A segment table this model has and the source's embedder lacks starts at zero (not at a random draw, which
    would shift every token from what the source computed); added to ``loaded``; returns their names."""
    out = []
    for key in initialised:
        if key.endswith(".segments.weight") and key[: -len("segments.weight")] + "tokens.weight" in src:
            loaded[key] = torch.zeros_like(own[key])
            out.append(key)
    return out


def _fold_segment_row_0(src: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> List[Tuple[str, str]]:
    """A source embedder's segment table (``embedders.<m>.segments.weight``) that the target lacks: add its row 0 to
    the source's token table (every token takes one row of each), so the target computes what the source did on
    single-segment inputs instead of losing row 0. In place on ``src``; returns ``(table, token table)`` pairs."""
    done = []
    for key in [k for k in src if k.endswith(".segments.weight") and k not in own]:
        tokens = key[: -len("segments.weight")] + "tokens.weight"
        if tokens in src and tokens in own:
            src[tokens] = src[tokens] + src[key][0].to(src[tokens].dtype)
            done.append((key, tokens))
    return done


@dataclass
class SourceTokenizers:
    """The tokenizers a warm-start source was trained with, checked against the run's (:func:`source_tokenizers`).

    A tokenizer fitted afresh can number tokens differently (fitting is not bit-reproducible across
    processes), and then the loaded embedding rows stand for other tokens. For each token modality (text,
    DNA) the source has a tokenizer for (an mmm ``.ckpt`` stores it, a ``save_encoder`` folder holds it),
    the run's must be the same: :meth:`check_given` compares a given one (``model.<name>.tokenizer_path``,
    or one already in the run folder) before anything is fitted; :meth:`check_fitted` compares one the
    run built or fitted itself (a k-mer DNA tokenizer is rebuilt identically) and, when it differs,
    removes it from the run folder and asks for the source's.

    Args:
        source: ``model.init_from``.
        found: modality name → (the source's tokenizer, where it was found).
        fitted_here: the modalities whose tokenizer the run will build or fit (none was given).
    """

    source: Path
    found: Dict[str, Tuple[object, str]] = field(default_factory=dict)
    fitted_here: List[str] = field(default_factory=list)

    def check_given(self, modalities: Dict[str, object], run_dir: Path) -> None:
        """Compare every given tokenizer with the source's (before the fit); note the ones to be fitted."""
        for name, (theirs, where) in self.found.items():
            m = modalities[name]
            own = run_dir / m.tokenizer_dir
            given = m.cfg.tokenizer_path or (str(own) if (own / m.saved_marker).is_file() else None)
            if given is None:
                self.fitted_here.append(name)
            elif not _same(m.load_tokenizer(given), theirs):
                raise WarmStartError(f"model.{name}.tokenizer_path {given} is not the {m.what} model.init_from "
                                     f"{self.source} was trained with ({where}): the loaded embedding rows would stand "
                                     f"for other tokens. Use the source's {m.what}")

    def check_fitted(self, modalities: Dict[str, object], run_dir: Path) -> None:
        """Compare the tokenizers the run built or fitted with the source's (after the fit)."""
        from mmm.encoders import TOKENIZER_SUBDIR

        for name in self.fitted_here:
            m, (theirs, where) = modalities[name], self.found[name]
            if _same(m.tokenizer, theirs):
                continue
            own = run_dir / m.tokenizer_dir
            shutil.rmtree(own, ignore_errors=True)  # fitted by this run: a rerun with tokenizer_path starts clean
            near = (self.source.parent.parent / m.tokenizer_dir if self.source.is_file()
                    else self.source / TOKENIZER_SUBDIR)
            hint = f" ({near} holds it)" if (near / m.saved_marker).is_file() else ""
            raise WarmStartError(f"model.init_from {self.source} was trained with its own {m.what} ({where}), and "
                                 f"the one fitted here numbers tokens differently: the loaded embedding rows would "
                                 f"stand for other tokens. Set model.{name}.tokenizer_path to the source's "
                                 f"{m.what}{hint}")


def _same(a: object, b: object) -> bool:
    from mmm.modalities.tokenizer_asset import same_tokenizer

    return same_tokenizer(a, b)


def source_tokenizers(source: PathLike, modalities: Dict[str, object]) -> SourceTokenizers:
    """The tokenizers ``source`` (``model.init_from``) holds for the run's token modalities.

    Args:
        source: an mmm ``.ckpt`` or a ``save_encoder`` folder (an HF BERT folder: none are read).
        modalities: the run's base modalities by name (token modalities have a ``tokenizer_dir``).
    """
    p = Path(source)
    if not p.exists():
        raise WarmStartError(f"model.init_from: {p} does not exist")
    found = {}
    for name, m in modalities.items():
        if hasattr(m, "tokenizer_dir"):
            tok, where = _source_tokenizer(p, name, m)
            if tok is not None:
                found[name] = (tok, where)
    return SourceTokenizers(p, found)


def _source_tokenizer(p: Path, name: str, modality: object) -> Tuple[object, str]:
    """The source's tokenizer of modality ``name`` and where it was found, or ``(None, "")``."""
    from mmm.encoders import ENCODER_META_FILE, TOKENIZER_SUBDIR, read_checkpoint
    from mmm.modalities.tokenizer_asset import tokenizer_from_files

    if p.is_file():
        try:
            files = read_checkpoint(p).assets.get(name) or {}
        except (ValueError, FileNotFoundError, OSError) as e:
            raise WarmStartError(f"model.init_from: cannot read {p}: {e}") from None
        if not files:
            return None, ""
        tok = tokenizer_from_files(files, str(p), modality.load_tokenizer, modality.saved_marker, modality.what)
        return tok, "stored in the checkpoint"
    if (p / ENCODER_META_FILE).is_file():
        tok_dir = p / TOKENIZER_SUBDIR  # where save_encoder writes a token encoder's tokenizer
        try:
            saved = _saved_encoder_modality(p)
        except (OSError, ValueError):
            return None, ""
        if saved == name and (tok_dir / modality.saved_marker).is_file():
            return modality.load_tokenizer(tok_dir), f"saved in {tok_dir}"
    return None, ""

