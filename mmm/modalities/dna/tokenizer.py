"""DNA tokenizers: single nucleotides, k-mers and learned BPE, behind one encoding with base offsets.

Three schemes are registered in :data:`mmm.registry.TOKENIZERS`:

* ``"dna_char"`` -- one token per nucleotide, the input of HyenaDNA (Nguyen et al. 2023,
  "HyenaDNA: Long-Range Genomic Sequence Modeling at Single Nucleotide Resolution") and Caduceus
  (Schiff et al. 2024, "Caduceus: Bi-Directional Equivariant Long-Range DNA Sequence Modeling").
* ``"dna_kmer"`` -- k-mers, either overlapping with stride 1 as DNABERT (Ji et al. 2021, "DNABERT:
  pre-trained Bidirectional Encoder Representations from Transformers model for DNA-language in
  genome") or non-overlapping with stride k as the Nucleotide Transformer (Dalla-Torre et al. 2023,
  "The Nucleotide Transformer: Building and Evaluating Robust Foundation Models for Human
  Genomics"), whose tail shorter than k becomes single-nucleotide tokens.
* ``"dna_bpe"`` -- byte-pair encoding learned on sequences, as DNABERT-2 (Zhou et al. 2024,
  "DNABERT-2: Efficient Foundation Model and Benchmark for Multi-Species Genome"); trained with HF
  ``tokenizers``.

Every scheme returns a :class:`DNAEncoding`: token ids plus, for each token, the half-open base
range ``[start, end)`` it covers in the input, so that maskers can reason about bases rather than
tokens (see :mod:`mmm.modalities.dna.masking`).

Input alphabet. ``A C G T N`` in either case; lowercase (soft-masked repeats in genome
assemblies) is uppercased, see :func:`soft_mask` to keep that information. The IUPAC ambiguity
codes ``R Y S W K M B D H V`` are read as ``N`` (an unknown base): a model sees "not sure", never a
15-letter alphabet. For k-mers, a k-mer holding any ``N`` is one ``[UNK]`` token. Anything else
(``U``, gaps ``-``, ``*``, digits, whitespace, non-ASCII) is an error naming the character and its
position.

Vocabulary layout of the fixed schemes: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``, then the
single nucleotides ``A C G T N`` (5..9), then (k-mers only) the ``4**k`` k-mers over ``ACGT`` in
lexicographic order. BPE keeps the same five specials at 0..4.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from mmm.masking.base import TokenVocab
from mmm.modalities.tokenizer_asset import RoleIds, SavedTokenizer
from mmm.registry import TOKENIZERS

__all__ = [
    "DNAEncoding",
    "DNATokenizer",
    "DNACharTokenizer",
    "DNAKmerTokenizer",
    "DNABPETokenizer",
    "DNASequenceError",
    "train_dna_bpe",
    "load_dna_tokenizer",
    "base_codes",
    "normalized_string",
    "find_invalid_base",
    "soft_mask",
    "reverse_complement",
    "SPECIAL_TOKENS",
    "IUPAC_AMBIGUOUS",
]

SPECIAL_TOKENS: Tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
NUCLEOTIDES = "ACGTN"
"""Single-nucleotide tokens, ids ``5 + code`` (code A=0, C=1, G=2, T=3, N=4)."""
IUPAC_AMBIGUOUS = "RYSWKMBDHV"
"""IUPAC ambiguity codes other than N; read as N by the tokenizers, kept as they are in shards."""
META_FILE = "mmm_dna_tokenizer.json"
HF_FILE = "tokenizer.json"
_META_VERSION = 1
_N_CODE = 4
_FIRST_BASE_ID = len(SPECIAL_TOKENS)
_FIRST_KMER_ID = _FIRST_BASE_ID + len(NUCLEOTIDES)
MAX_K = 8
ALLOWED = "A C G T N, IUPAC ambiguity codes R Y S W K M B D H V (read as N), in either case (lowercase = soft-masked)"

PathLike = Union[str, Path]

# byte -> nucleotide code (0..4), 255 for anything not allowed
_CODE = np.full(256, 255, dtype=np.uint8)
for _i, _b in enumerate("ACGT"):
    _CODE[ord(_b)] = _CODE[ord(_b.lower())] = _i
for _b in "N" + IUPAC_AMBIGUOUS:
    _CODE[ord(_b)] = _CODE[ord(_b.lower())] = _N_CODE

_LETTERS = np.frombuffer(NUCLEOTIDES.encode("ascii"), dtype=np.uint8)
_COMPLEMENT = str.maketrans("ACGTNRYSWKMBDHVacgtnryswkmbdhv", "TGCANYRSWMKVHDBtgcanyrswmkvhdb")


class DNASequenceError(ValueError):
    """A sequence a tokenizer cannot read; the message names the character, position and alphabet."""


# ---------------------------------------------------------------------- sequence helpers
def find_invalid_base(seq: str) -> Optional[Tuple[int, str]]:
    """First character outside the accepted alphabet, as ``(position, char)``, or None.

    Args:
        seq: the sequence (any case).
    """
    try:
        raw = seq.encode("ascii")
    except UnicodeEncodeError as exn:
        return exn.start, seq[exn.start]
    bad = _CODE[np.frombuffer(raw, dtype=np.uint8)] == 255
    if not bad.any():
        return None
    pos = int(np.argmax(bad))
    return pos, seq[pos]


def _invalid_message(seq: str, pos: int, char: str) -> str:
    n_bad = sum(1 for c in seq if ord(c) > 127 or _CODE[ord(c)] == 255)
    more = f" ({n_bad - 1} more invalid character(s) after it)" if n_bad > 1 else ""
    return (f"invalid character {char!r} at position {pos} (0-based) of a {len(seq)}-character DNA sequence{more}; "
            f"allowed: {ALLOWED}")


def base_codes(seq: str) -> np.ndarray:
    """Nucleotide codes of a sequence: A=0 C=1 G=2 T=3, N and other IUPAC ambiguity codes 4.

    Args:
        seq: the sequence; lowercase is accepted.

    Returns:
        (L,) uint8 codes.

    Raises:
        DNASequenceError: empty sequence, non-str input, or a character outside the alphabet.
    """
    if not isinstance(seq, str):
        raise TypeError(f"a DNA sequence must be a str, got {type(seq).__name__}")
    if not seq:
        raise DNASequenceError("cannot encode an empty DNA sequence (0 bases)")
    bad = find_invalid_base(seq)
    if bad is not None:
        raise DNASequenceError(_invalid_message(seq, *bad))
    return _CODE[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]


def soft_mask(seq: str) -> np.ndarray:
    """Which bases are soft-masked (written in lowercase, e.g. repeats in UCSC/Ensembl assemblies).

    Args:
        seq: the sequence as read from the FASTA file.

    Returns:
        (L,) bool, True at lowercase bases.
    """
    base_codes(seq)  # validates
    raw = np.frombuffer(seq.encode("ascii"), dtype=np.uint8)
    return raw >= ord("a")


def reverse_complement(seq: str) -> str:
    """Reverse complement with IUPAC complements (R<->Y, K<->M, B<->V, D<->H; S, W, N fixed); case kept.

    Used as an augmentation (the data stage applies it with some probability): the other strand
    carries the same information.

    Args:
        seq: the sequence.
    """
    if not isinstance(seq, str):
        raise TypeError(f"a DNA sequence must be a str, got {type(seq).__name__}")
    bad = find_invalid_base(seq)
    if bad is not None:
        raise DNASequenceError(_invalid_message(seq, *bad))
    return seq.translate(_COMPLEMENT)[::-1]


def normalized_string(codes: np.ndarray) -> str:
    """The uppercase ``ACGTN`` string of nucleotide codes (ambiguity codes become ``N``).

    Args:
        codes: (L,) uint8 codes from :func:`base_codes`.
    """
    return _LETTERS[codes].tobytes().decode("ascii")


# ---------------------------------------------------------------------- encoding
@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class DNAEncoding:
    """One tokenized sequence.

    Args:
        ids: (T,) int64 token ids, ``[CLS]`` first and ``[SEP]`` last.
        starts: (T,) int64 first base covered by each token; -1 for special tokens.
        ends: (T,) int64 one past the last base covered; -1 for special tokens.
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __post_init__(self) -> None:
        if not (self.ids.ndim == 1 and self.ids.shape == self.starts.shape == self.ends.shape):
            raise ValueError(
                f"ids, starts and ends must be 1-D of equal length, got {self.ids.shape}, {self.starts.shape}, {self.ends.shape}"
            )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_bases(self) -> int:
        """One past the last base any token covers (the sequence length for a whole encoding)."""
        return int(self.ends.max(initial=0))


def _wrap(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, add_special_tokens: bool) -> DNAEncoding:
    ids = ids.astype(np.int64, copy=False)
    starts = starts.astype(np.int64, copy=False)
    ends = ends.astype(np.int64, copy=False)
    if add_special_tokens:
        ids = np.concatenate([[CLS_ID], ids, [SEP_ID]]).astype(np.int64)
        starts = np.concatenate([[-1], starts, [-1]]).astype(np.int64)
        ends = np.concatenate([[-1], ends, [-1]]).astype(np.int64)
    return DNAEncoding(ids=ids, starts=starts, ends=ends)


class DNATokenizer(RoleIds, SavedTokenizer, ABC):
    """What every DNA tokenizer offers; subclasses implement :meth:`_tokenize` and the vocabulary."""

    kind: str
    meta_file, meta_version, what = META_FILE, _META_VERSION, "DNA tokenizer"
    role_ids = {"pad": PAD_ID, "unk": UNK_ID, "cls": CLS_ID, "sep": SEP_ID, "mask": MASK_ID}

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, specials included."""

    def vocab(self) -> TokenVocab:
        """The :class:`TokenVocab` a masker needs for this tokenizer."""
        return TokenVocab(size=self.vocab_size, mask_id=MASK_ID, special_ids=self.special_ids)

    @abstractmethod
    def _tokenize(self, codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, starts, ends)`` of the sequence without specials; codes as from :func:`base_codes`."""

    def encode(self, seq: str, add_special_tokens: bool = True) -> DNAEncoding:
        """Tokenize one sequence.

        Args:
            seq: bases (see the module docstring for the alphabet); lowercase is uppercased.
            add_special_tokens: put ``[CLS]`` first and ``[SEP]`` last (offsets -1).

        Raises:
            DNASequenceError: empty sequence or a character outside the alphabet.
        """
        return _wrap(*self._tokenize(base_codes(seq)), add_special_tokens)

    @abstractmethod
    def token_strings(self) -> List[str]:
        """The token of each id, in id order (specials included)."""

    @abstractmethod
    def max_bases(self, max_tokens: int) -> int:
        """Longest length L such that every sequence of at most L bases fits in ``max_tokens`` tokens.

        Counts ``[CLS]`` and ``[SEP]``; use it to cut windows (tails included) that never need truncation.

        Args:
            max_tokens: token budget per sequence, specials included (at least 3).
        """

    def _check_max_tokens(self, max_tokens: int) -> int:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 3:
            raise ValueError(f"max_tokens must be an int >= 3 ([CLS], one token, [SEP]), got {max_tokens!r}")
        return int(max_tokens) - 2

    def _check_ids(self, ids: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of ints, got shape {arr.shape} dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        return arr.astype(np.int64, copy=False)

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        """Bases spelled by token ids (for inspection): ``[CLS]``/``[SEP]``/``[PAD]`` are dropped and
        ``[UNK]``/``[MASK]`` read as ``N`` for each base they stand for.

        Args:
            ids: token ids (any integer sequence or 1-D array).
        """
        arr = self._check_ids(ids)
        table = self._decode_table()
        return "".join(table[i] for i in arr.tolist())

    def _decode_table(self) -> List[str]:
        table = list(self.token_strings())
        table[PAD_ID] = table[CLS_ID] = table[SEP_ID] = ""
        table[UNK_ID] = table[MASK_ID] = "N"
        return table

    # ------------------------------------------------------------------ persistence
    def saved_meta(self) -> Dict[str, Any]:
        """``kind`` and the special tokens (a k-mer tokenizer adds ``k`` and ``overlapping``)."""
        return {"kind": self.kind, "special_tokens": list(SPECIAL_TOKENS)}

    @classmethod
    def from_saved(cls, directory: Path, meta: Dict[str, Any]) -> "DNATokenizer":
        """The DNA tokenizer of ``meta["kind"]`` (BPE reads ``tokenizer.json`` beside the metadata); what
        :meth:`load` (:meth:`~mmm.modalities.tokenizer_asset.SavedTokenizer.load`) builds."""
        kind = meta["kind"]
        if kind == "dna_char":
            return DNACharTokenizer()
        if kind == "dna_kmer":
            return DNAKmerTokenizer(k=meta.get("k"), overlapping=meta.get("overlapping"))
        if kind == "dna_bpe":
            from tokenizers import Tokenizer

            hf = directory / HF_FILE
            if not hf.is_file():
                raise FileNotFoundError(f"BPE tokenizer file {hf} is missing")
            try:
                return DNABPETokenizer(Tokenizer.from_file(str(hf)))
            except Exception as exn:  # the Rust side raises a plain Exception on bad JSON
                raise ValueError(f"cannot read BPE tokenizer {hf}: {exn}") from exn
        raise ValueError(f"{directory / META_FILE}: unknown DNA tokenizer kind {kind!r}; known: dna_char, dna_kmer, "
                         f"dna_bpe")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------- single nucleotides
@TOKENIZERS.register("dna_char")
class DNACharTokenizer(DNATokenizer):
    """One token per base: ``A C G T N`` (ids 5..9) after the five specials."""

    kind = "dna_char"

    @property
    def vocab_size(self) -> int:
        return _FIRST_KMER_ID

    def token_strings(self) -> List[str]:
        return list(SPECIAL_TOKENS) + list(NUCLEOTIDES)

    def _tokenize(self, codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts = np.arange(codes.size, dtype=np.int64)
        return codes.astype(np.int64) + _FIRST_BASE_ID, starts, starts + 1

    def max_bases(self, max_tokens: int) -> int:
        return self._check_max_tokens(max_tokens)


# ---------------------------------------------------------------------- k-mers
@TOKENIZERS.register("dna_kmer")
class DNAKmerTokenizer(DNATokenizer):
    """k-mer tokens: overlapping (stride 1, DNABERT) or non-overlapping (stride k, Nucleotide Transformer).

    Any k-mer containing ``N`` (or another ambiguity code) is ``[UNK]``. A sequence shorter than k
    (overlapping) or the tail after the last whole k-mer (non-overlapping) becomes single-nucleotide
    tokens, so every base is covered by at least one token.

    Args:
        k: k-mer length, 1..8 (vocabulary ``10 + 4**k``).
        overlapping: stride 1 when True, stride k when False.
    """

    kind = "dna_kmer"

    def __init__(self, k: int = 6, overlapping: bool = True) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an int in [1, {MAX_K}] (vocabulary 10 + 4**k), got {k!r}")
        if not isinstance(overlapping, bool):
            raise ValueError(f"overlapping must be a bool, got {overlapping!r}")
        self.k = int(k)
        self.overlapping = overlapping
        self._powers = 4 ** np.arange(self.k - 1, -1, -1, dtype=np.int64)
        self._strings: Optional[List[str]] = None

    @property
    def vocab_size(self) -> int:
        return _FIRST_KMER_ID + 4**self.k

    def token_strings(self) -> List[str]:
        if self._strings is None:
            kmers = ["".join(p) for p in itertools.product("ACGT", repeat=self.k)]
            self._strings = list(SPECIAL_TOKENS) + list(NUCLEOTIDES) + kmers
        return self._strings

    def _kmer_ids(self, windows: np.ndarray) -> np.ndarray:
        """(T, k) codes -> (T,) ids; windows holding N become [UNK]."""
        ids = _FIRST_KMER_ID + (windows.astype(np.int64) % 4) @ self._powers
        return np.where((windows == _N_CODE).any(axis=1), UNK_ID, ids)

    def _tokenize(self, codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        k, n = self.k, codes.size
        if self.overlapping:
            if n < k:  # too short for one k-mer: single nucleotides
                starts = np.arange(n, dtype=np.int64)
                return codes.astype(np.int64) + _FIRST_BASE_ID, starts, starts + 1
            windows = np.lib.stride_tricks.sliding_window_view(codes, k)  # (n - k + 1, k)
            starts = np.arange(n - k + 1, dtype=np.int64)
            return self._kmer_ids(windows), starts, starts + k
        q = n // k
        body = self._kmer_ids(codes[: q * k].reshape(q, k))
        tail = codes[q * k :].astype(np.int64) + _FIRST_BASE_ID
        starts = np.concatenate([np.arange(q, dtype=np.int64) * k, np.arange(q * k, n, dtype=np.int64)])
        ends = np.concatenate([starts[:q] + k, starts[q:] + 1])
        return np.concatenate([body, tail]), starts, ends

    def tokens_for(self, n_bases: np.ndarray) -> np.ndarray:
        """Number of tokens (without specials) for sequences of ``n_bases`` bases.

        Args:
            n_bases: array of sequence lengths.
        """
        n = np.asarray(n_bases, dtype=np.int64)
        if self.overlapping:
            return np.where(n < self.k, n, n - self.k + 1)
        return n // self.k + n % self.k

    def max_bases(self, max_tokens: int) -> int:
        budget = self._check_max_tokens(max_tokens)
        # Token counts are not monotonic in length (k=6 non-overlapping: 12 bases = 2 tokens,
        # 11 = 1 + 5; overlapping: 5 bases = 5 single tokens, 6 = 1): take the longest L whose
        # every shorter length fits too.
        lengths = np.arange((budget + self.k - 1 if self.overlapping else budget * self.k) + 1)
        fits = np.maximum.accumulate(self.tokens_for(lengths)) <= budget
        return int(np.flatnonzero(fits)[-1])

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        """Bases spelled by the ids. Overlapping k-mers are laid out one base apart; a base covered
        only by ``[UNK]``/``[MASK]`` tokens reads ``N``. Non-overlapping ``[UNK]``/``[MASK]`` read as
        k ``N``. Specials ``[CLS]``/``[SEP]``/``[PAD]`` are dropped.

        Args:
            ids: token ids.
        """
        arr = self._check_ids(ids)
        arr = arr[~np.isin(arr, [PAD_ID, CLS_ID, SEP_ID])]
        table = self.token_strings()
        if not self.overlapping:
            return "".join("N" * self.k if i in (UNK_ID, MASK_ID) else table[i] for i in arr.tolist())
        if arr.size and (arr < _FIRST_KMER_ID).all() and not np.isin(arr, [UNK_ID, MASK_ID]).any():
            return "".join(table[i] for i in arr.tolist())  # a sequence shorter than k
        out = ["N"] * (arr.size + self.k - 1) if arr.size else []
        for t, i in enumerate(arr.tolist()):
            if i >= _FIRST_KMER_ID:
                out[t : t + self.k] = table[i]
            elif i >= _FIRST_BASE_ID:
                out[t] = table[i]
        return "".join(out)

    def saved_meta(self) -> Dict[str, Any]:
        return {**super().saved_meta(), "k": self.k, "overlapping": self.overlapping}

    def __repr__(self) -> str:
        return f"DNAKmerTokenizer(k={self.k}, overlapping={self.overlapping}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------- BPE
class DNABPETokenizer(DNATokenizer):
    """BPE over ``A C G T N`` learned on sequences (DNABERT-2); build it with :func:`train_dna_bpe`.

    The whole (normalized, uppercase) sequence is one BPE word: no pre-tokenization, so merges may
    span any position. Each token covers at least one base.

    Args:
        tokenizer: a trained HF ``tokenizers.Tokenizer`` with the five specials at ids 0..4.
    """

    kind = "dna_bpe"

    def __init__(self, tokenizer: Any) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"BPE tokenizer must have {tok} at id {i}, got {tokenizer.token_to_id(tok)}")
        missing = [b for b in NUCLEOTIDES if tokenizer.token_to_id(b) is None]
        if missing:
            raise ValueError(f"BPE tokenizer lacks single-nucleotide token(s) {missing}")
        self.tokenizer = tokenizer
        self._strings: Optional[List[str]] = None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def token_strings(self) -> List[str]:
        if self._strings is None:
            by_id = sorted(self.tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            if [i for _, i in by_id] != list(range(len(by_id))):
                raise ValueError("BPE token ids are not contiguous from 0")
            self._strings = [t for t, _ in by_id]
        return self._strings

    def _tokenize(self, codes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        enc = self.tokenizer.encode(normalized_string(codes), add_special_tokens=False)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        return np.asarray(enc.ids, dtype=np.int64), offsets[:, 0], offsets[:, 1]

    def max_bases(self, max_tokens: int) -> int:
        # Worst case every token is a single base; typical BPE tokens cover several bases.
        return self._check_max_tokens(max_tokens)

    def save(self, directory: PathLike) -> Path:
        out = super().save(directory)
        self.tokenizer.save(str(out / HF_FILE))
        return out

    def __repr__(self) -> str:
        return f"DNABPETokenizer(vocab_size={self.vocab_size})"


@TOKENIZERS.register("dna_bpe")
def train_dna_bpe(
    sequences: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, max_token_length: Optional[int] = None
) -> DNABPETokenizer:
    """Learn a DNABERT-2-style BPE vocabulary on sequences.

    Sequences are normalized as by :meth:`DNATokenizer.encode` (uppercase, ambiguity codes -> N)
    before training; an invalid sequence is an error naming its index.

    Args:
        sequences: training sequences (any iterable of str; consumed once).
        vocab_size: target vocabulary size, the 5 specials and 5 nucleotides included.
        min_frequency: minimum count for a merge to be learned.
        max_token_length: longest token in bases (None: no limit).
    """
    from tokenizers import Tokenizer, models, trainers

    if isinstance(sequences, str):
        raise TypeError("sequences must be an iterable of strings, got a single str")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _FIRST_KMER_ID:
        raise ValueError(f"vocab_size must be an int >= {_FIRST_KMER_ID} (5 specials + 5 nucleotides), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    if max_token_length is not None and (not isinstance(max_token_length, int) or max_token_length < 1):
        raise ValueError(f"max_token_length must be None or an int >= 1, got {max_token_length!r}")
    count = 0

    def normalized() -> Iterable[str]:
        nonlocal count
        for i, seq in enumerate(sequences):
            try:
                codes = base_codes(seq)
            except (DNASequenceError, TypeError) as exn:
                raise DNASequenceError(f"training sequence {i}: {exn}") from None
            count += 1
            yield normalized_string(codes)

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK_ID]))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(NUCLEOTIDES),
        limit_alphabet=len(NUCLEOTIDES),
        max_token_length=max_token_length,
        show_progress=False,
    )
    tok.train_from_iterator(normalized(), trainer=trainer)
    if count == 0:
        raise ValueError("dna_bpe training got no sequences (the iterable was empty)")
    return DNABPETokenizer(tok)


# ---------------------------------------------------------------------- loading
def load_dna_tokenizer(directory: PathLike) -> DNATokenizer:
    """Restore any DNA tokenizer written by :meth:`DNATokenizer.save`, dispatching on its kind.

    Args:
        directory: the folder holding ``mmm_dna_tokenizer.json``.
    """
    return DNATokenizer.load(directory)
