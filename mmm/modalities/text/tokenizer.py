"""Subword text tokenizers for masked language modeling, built on HF ``tokenizers``.

Two trainable schemes are registered in :data:`mmm.registry.TOKENIZERS`:

* ``"wordpiece"`` -- WordPiece with the BERT normalizer and pre-tokenizer and ``##`` continuation
  pieces (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding"; WordPiece from Wu et al. 2016).
* ``"bpe"`` -- byte-level BPE as used by RoBERTa (Liu et al. 2019, "RoBERTa: A Robustly Optimized
  BERT Pretraining Approach"; byte-level BPE from Radford et al. 2019, GPT-2).

Both are wrapped in :class:`TextTokenizer`, which exposes the five special-token *roles* a masked
model needs (pad, unk, cls, sep, mask) under one naming, so that the rest of the framework never
has to know which scheme produced the ids. Word ids come from the HF encoding (one id per
pre-tokenized word), so whole-word maskers work the same for ``##`` pieces and for ``Ġ`` pieces.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import numpy as np
from tokenizers import Encoding, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mmm.masking.base import TokenVocab
from mmm.modalities.tokenizer_asset import RoleIds, SavedTokenizer
from mmm.registry import TOKENIZERS

ROLES: Tuple[str, ...] = ("pad", "unk", "cls", "sep", "mask")
"""Special-token roles, in the id order both schemes assign them (pad is always id 0)."""

WORDPIECE_SPECIALS: Dict[str, str] = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
BPE_SPECIALS: Dict[str, str] = {"pad": "<pad>", "unk": "<unk>", "cls": "<s>", "sep": "</s>", "mask": "<mask>"}

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "mmm_tokenizer.json"
VOCAB_FILE = "vocab.txt"
_META_VERSION = 1

PathLike = Union[str, Path]
Encoded = Tuple[np.ndarray, np.ndarray]


class TextTokenizer(RoleIds, SavedTokenizer):
    """A trained HF tokenizer plus the special-token roles masked modeling needs.

    Args:
        tokenizer: the HF ``tokenizers.Tokenizer``; every role token must be in its vocabulary.
        roles: role name (``pad``, ``unk``, ``cls``, ``sep``, ``mask``) -> token string.
        lowercase: whether the normalizer lowercases (recorded so a saved tokenizer says so).
        kind: the scheme, ``"wordpiece"`` or ``"bpe"``; decides whether ``vocab.txt`` is written.
    """

    meta_file, meta_keys, meta_version = META_FILE, ("kind", "lowercase", "roles"), _META_VERSION

    def __init__(self, tokenizer: Tokenizer, roles: Mapping[str, str], lowercase: bool, kind: str) -> None:
        if kind not in ("wordpiece", "bpe"):
            raise ValueError(f"kind must be 'wordpiece' or 'bpe', got {kind!r}")
        missing = [r for r in ROLES if r not in roles]
        if missing:
            raise ValueError(f"roles is missing {missing}; expected a token string for each of {list(ROLES)}")
        ids: Dict[str, int] = {}
        for role in ROLES:
            tid = tokenizer.token_to_id(roles[role])
            if tid is None:
                raise ValueError(f"{role} token {roles[role]!r} is not in the tokenizer vocabulary")
            ids[role] = int(tid)
        self.tokenizer = tokenizer
        self.roles: Dict[str, str] = {r: roles[r] for r in ROLES}
        self.lowercase = bool(lowercase)
        self.kind = kind
        self.role_ids = ids
        self._special_arr = np.array(sorted(self.special_ids), dtype=np.int64)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def vocab(self) -> TokenVocab:
        """The :class:`TokenVocab` a masker needs for this tokenizer."""
        return TokenVocab(size=self.vocab_size, mask_id=self.mask_id, special_ids=self.special_ids)

    # ------------------------------------------------------------------ encoding
    def _to_arrays(self, enc: Encoding) -> Encoded:
        ids = np.asarray(enc.ids, dtype=np.int64)
        try:
            word_ids = np.asarray(enc.word_ids, dtype=np.int64)
        except TypeError:  # a None (token outside any word) in the list
            word_ids = np.array([-1 if w is None else w for w in enc.word_ids], dtype=np.int64)
        # Role tokens written literally in the text are matched as specials: they belong to no word.
        if ids.size:
            word_ids[np.isin(ids, self._special_arr)] = -1
        return ids, word_ids

    def encode(self, text: str) -> Encoded:
        """Tokenize ``text`` without adding special tokens.

        Args:
            text: raw text.

        Returns:
            ``(ids, word_ids)``, both (T,) int64; ``word_ids[t]`` is the index of the pre-tokenized
            word token ``t`` comes from (-1 for a special token written in the text).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._to_arrays(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> List[Encoded]:
        """:meth:`encode` for many texts at once (tokenized in parallel by the Rust library).

        Args:
            texts: raw texts.
        """
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must all be str; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [self._to_arrays(e) for e in encs]

    def encode_chunks(self, text: str, max_len: int) -> List[Encoded]:
        """Tokenize ``text`` and cut it into ``[CLS] ... [SEP]`` pieces of at most ``max_len`` tokens.

        Every token of the text lands in exactly one piece, in order. A cut falls on a word boundary
        whenever the word would fit in a piece on its own; a word longer than a piece is split.

        Args:
            text: raw text; text the tokenizer keeps nothing of gives an empty list (WordPiece: empty or
                whitespace-only text; byte-level BPE keeps whitespace as tokens).
            max_len: maximum piece length including ``[CLS]`` and ``[SEP]``; must be at least 3.

        Returns:
            A list of ``(ids, word_ids)`` pairs; specials have word id -1 and the word ids inside a
            piece are renumbered 0, 1, 2, ... in order of appearance.
        """
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 3:
            raise ValueError(f"max_len must be an int >= 3 (room for [CLS], one token and [SEP]), got {max_len!r}")
        ids, word_ids = self.encode(text)
        return self.chunk(ids, word_ids, int(max_len))

    def chunk(self, ids: np.ndarray, word_ids: np.ndarray, max_len: int) -> List[Encoded]:
        """Cut an already tokenized text (as from :meth:`encode`) into pieces; see :meth:`encode_chunks`.

        Args:
            ids: (T,) int64 token ids without special tokens around them.
            word_ids: (T,) int64 word index of each token.
            max_len: maximum piece length including ``[CLS]`` and ``[SEP]``; at least 3.
        """
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 (room for [CLS], one token and [SEP]), got {max_len!r}")
        ids = np.asarray(ids, dtype=np.int64)
        word_ids = np.asarray(word_ids, dtype=np.int64)
        if ids.shape != word_ids.shape or ids.ndim != 1:
            raise ValueError(f"ids and word_ids must be 1-D of equal length, got shapes {ids.shape} and {word_ids.shape}")
        n = ids.shape[0]
        if n == 0:
            return []
        body = max_len - 2
        # Index of the first token of the word each token belongs to (specials are their own word).
        is_start = np.ones(n, dtype=bool)
        is_start[1:] = (word_ids[1:] != word_ids[:-1]) | (word_ids[1:] < 0)
        word_start = np.maximum.accumulate(np.where(is_start, np.arange(n), 0))

        cuts = [0]
        start = 0
        while n - start > body:
            end = start + body
            if not is_start[end]:
                ws = int(word_start[end])
                if ws > start:  # the cut word can move whole into the next piece
                    end = ws
            cuts.append(end)
            start = end
        cuts.append(n)

        cls = np.array([self.cls_id], dtype=np.int64)
        sep = np.array([self.sep_id], dtype=np.int64)
        minus1 = np.array([-1], dtype=np.int64)
        pieces: List[Encoded] = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            w = word_ids[a:b]
            starts = is_start[a:b].copy()
            starts[0] = True
            renum = np.cumsum(starts & (w >= 0)) - 1
            renum = np.where(w >= 0, np.maximum(renum, 0), -1)
            pieces.append((np.concatenate([cls, ids[a:b], sep]), np.concatenate([minus1, renum, minus1])))
        return pieces

    def pad_batch(self, texts: Sequence[str], max_len: int, truncate: bool = False) -> Dict[str, "torch.Tensor"]:
        """Encode texts as a right-padded batch for an encoder's ``forward(input_ids, attention_mask)``.

        Args:
            texts: the texts; each becomes ``[CLS] ... [SEP]``.
            max_len: the longest allowed row (the encoder's position table size).
            truncate: cut rows longer than ``max_len``; otherwise such a text is an error naming it.

        Returns:
            ``{"input_ids": (B, T) int64, "attention_mask": (B, T) int64}`` with T the longest row.
        """
        import torch

        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        rows = []
        for i, (ids, _) in enumerate(self.encode_batch(list(texts))):
            row = np.concatenate([[self.cls_id], ids, [self.sep_id]])
            if len(row) > max_len:
                if not truncate:
                    raise ValueError(f"text {i} is {len(row)} tokens long, over max_len={max_len} "
                                     "(pass truncate=True, or split it with encode_chunks)")
                row = np.concatenate([row[: max_len - 1], [self.sep_id]])
            rows.append(row)
        width = max(len(r) for r in rows) if rows else 0
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.from_numpy(r.astype(np.int64))
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: Union[Sequence[int], np.ndarray], skip_special_tokens: bool = True) -> str:
        """Turn token ids back into text.

        Args:
            ids: token ids (any integer sequence or 1-D array).
            skip_special_tokens: drop the role tokens from the output.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of ints, got shape {arr.shape} dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        return self.tokenizer.decode(arr.tolist(), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: PathLike) -> Path:
        """Write ``tokenizer.json``, ``mmm_tokenizer.json`` and (WordPiece) ``vocab.txt``.

        Args:
            directory: output folder, created if needed.

        Returns:
            The folder as a :class:`~pathlib.Path`.
        """
        out = super().save(directory)  # mmm_tokenizer.json
        self.tokenizer.save(str(out / TOKENIZER_FILE))
        if self.kind == "wordpiece":
            by_id = sorted(self.tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            if [i for _, i in by_id] != list(range(len(by_id))):
                raise ValueError("cannot write vocab.txt: token ids are not contiguous from 0")
            (out / VOCAB_FILE).write_text("".join(tok + "\n" for tok, _ in by_id), encoding="utf-8")
        return out

    def saved_meta(self) -> Dict[str, object]:
        """``kind``, ``lowercase`` and ``roles`` (what :meth:`from_saved` needs beside ``tokenizer.json``)."""
        return {"kind": self.kind, "lowercase": self.lowercase, "roles": self.roles}

    @classmethod
    def from_saved(cls, directory: Path, meta: Dict[str, object]) -> "TextTokenizer":
        """The tokenizer in ``directory/tokenizer.json`` with the roles and settings of ``meta`` (see
        :meth:`~mmm.modalities.tokenizer_asset.SavedTokenizer.load`, which :meth:`load` is)."""
        tok_path = directory / TOKENIZER_FILE
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer file {tok_path} is missing (expected {TOKENIZER_FILE} and {META_FILE})")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a plain Exception on bad JSON or schema
            raise ValueError(f"cannot read tokenizer {tok_path}: {e}") from e
        return cls(tokenizer, meta["roles"], bool(meta["lowercase"]), meta["kind"])

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, lowercase={self.lowercase})"


# ---------------------------------------------------------------------- training
def _check_train_args(vocab_size: int, min_frequency: int, minimum: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum}, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")


def _train(tokenizer: Tokenizer, trainer: object, texts: Iterable[str], kind: str) -> None:
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, got a single str")
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() == 0:
        raise ValueError(f"{kind} training produced an empty vocabulary; was the text iterable empty?")


@TOKENIZERS.register("wordpiece")
def train_wordpiece(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True
) -> TextTokenizer:
    """Train a BERT-style WordPiece tokenizer (``[PAD]``=0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``).

    Args:
        texts: training texts (any iterable of str; consumed once).
        vocab_size: target vocabulary size, specials included.
        min_frequency: minimum count for a merged piece to enter the vocabulary.
        lowercase: lowercase (and strip accents, as BERT uncased does) before tokenizing.
    """
    _check_train_args(vocab_size, min_frequency, len(ROLES) + 1)
    specials = [WORDPIECE_SPECIALS[r] for r in ROLES]
    tok = Tokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIALS["unk"], continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    _train(tok, trainer, texts, "wordpiece")
    cls_t, sep_t = WORDPIECE_SPECIALS["cls"], WORDPIECE_SPECIALS["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls_t} $A {sep_t}",
        pair=f"{cls_t} $A {sep_t} $B:1 {sep_t}:1",
        special_tokens=[(cls_t, tok.token_to_id(cls_t)), (sep_t, tok.token_to_id(sep_t))],
    )
    return TextTokenizer(tok, WORDPIECE_SPECIALS, lowercase, "wordpiece")


@TOKENIZERS.register("bpe")
def train_bpe(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True
) -> TextTokenizer:
    """Train a RoBERTa-style byte-level BPE tokenizer (``<pad>``=0, ``<unk>``, ``<s>``, ``</s>``, ``<mask>``).

    Args:
        texts: training texts (any iterable of str; consumed once).
        vocab_size: target vocabulary size, specials and the 256 byte symbols included.
        min_frequency: minimum count for a merge to be learned.
        lowercase: lowercase before tokenizing.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    _check_train_args(vocab_size, min_frequency, len(ROLES) + len(alphabet))
    specials = [BPE_SPECIALS[r] for r in ROLES]
    tok = Tokenizer(models.BPE(unk_token=BPE_SPECIALS["unk"]))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    _train(tok, trainer, texts, "bpe")
    cls_t, sep_t = BPE_SPECIALS["cls"], BPE_SPECIALS["sep"]
    tok.post_processor = processors.RobertaProcessing(  # (sep, cls, trim_offsets, add_prefix_space)
        (sep_t, tok.token_to_id(sep_t)), (cls_t, tok.token_to_id(cls_t)), True, False
    )
    return TextTokenizer(tok, BPE_SPECIALS, lowercase, "bpe")
