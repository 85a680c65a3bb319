"""The DNA modality in a run: a nucleotide tokenizer as its asset, DNA maskers, MLM batches.

Tokenizers (``model.dna.tokenizer``): single nucleotides (HyenaDNA, Nguyen et al. 2023),
overlapping k-mers (DNABERT, Ji et al. 2021), non-overlapping k-mers (Nucleotide Transformer,
Dalla-Torre et al. 2023) or BPE learned on the training shards (DNABERT-2, Zhou et al. 2024); see
:mod:`mmm.modalities.dna.tokenizer`. The embedder is the text one (token + position embeddings).
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional


from mmm.config import ComponentConfig, DNAConfig, ModelConfig
from mmm.data.epoch import EpochCounter
from mmm.data.tar import ReadOptions
from mmm.modalities.dna import codec as dna_codec
from mmm.encoders import TokenEncoderParts
from mmm.modalities.base import Handler, Modality
from mmm.modalities.tokenizer_asset import TokenizerAsset
from mmm.modalities.dna.tokenizer import META_FILE, DNAKmerTokenizer, DNATokenizer, load_dna_tokenizer
from mmm.registry import MODALITIES, TOKENIZERS

logger = logging.getLogger("mmm.train")

TOKENIZER_DIR = "dna_tokenizer"
DNA_TOKENIZERS = ("dna_char", "dna_kmer", "dna_bpe")


def build_dna_tokenizer(cfg: DNAConfig, train_urls: List[str], options: Optional[ReadOptions] = None) -> DNATokenizer:
    """A new tokenizer as ``cfg`` describes: built (char, k-mer) or trained on ``train_urls`` (BPE).

    Args:
        cfg: the ``model.dna`` section.
        train_urls: training shards (read only for BPE, up to ``tokenizer_train_docs`` windows).
        options: how the shards are read (:class:`~mmm.data.tar.ReadOptions`); None: defaults.
    """
    if cfg.tokenizer == "dna_char":
        return TOKENIZERS.create("dna_char")
    if cfg.tokenizer == "dna_kmer":
        return TOKENIZERS.create("dna_kmer", k=cfg.k, overlapping=cfg.overlapping)
    if cfg.tokenizer == "dna_bpe":
        logger.info("training a DNA BPE tokenizer (vocab %d) on up to %d windows", cfg.vocab_size,
                    cfg.tokenizer_train_docs)
        seqs = itertools.islice(dna_codec.iter_sequences(train_urls, options), cfg.tokenizer_train_docs)
        return TOKENIZERS.create("dna_bpe", sequences=seqs, vocab_size=cfg.vocab_size)
    raise ValueError(f"model.dna.tokenizer must be one of {DNA_TOKENIZERS}, got {cfg.tokenizer!r}")


def describe_mismatch(tok: DNATokenizer, cfg: DNAConfig) -> Optional[str]:
    """How a loaded tokenizer differs from what ``cfg`` asks for, or None when it fits."""
    if tok.kind != cfg.tokenizer:
        return f"it is {tok.kind!r}, the config asks for {cfg.tokenizer!r}"
    if isinstance(tok, DNAKmerTokenizer) and (tok.k, tok.overlapping) != (cfg.k, cfg.overlapping):
        return (f"it has k={tok.k}, overlapping={tok.overlapping}; the config asks for k={cfg.k}, "
                f"overlapping={cfg.overlapping}")
    if cfg.tokenizer == "dna_bpe" and tok.vocab_size > cfg.vocab_size:  # BPE may stop short of the size asked for
        return f"it holds {tok.vocab_size} tokens; the config asks for vocab_size {cfg.vocab_size}"
    return None


@MODALITIES.register("dna")
class DNAModality(TokenizerAsset, TokenEncoderParts, Modality):
    """DNA windows for masked nucleotide modeling: tokenizer loaded, reused from the run folder, or built."""

    name = "dna"
    order = 30
    config_class = DNAConfig
    asset_settings = ("tokenizer", "k", "overlapping", "vocab_size", "tokenizer_train_docs")
    config_help = "DNA modality"
    masks = ("dna",)
    masks_what = "DNA"
    masker_hint = " (dna_span for overlapping k-mers)"
    load_tokenizer = staticmethod(load_dna_tokenizer)
    tokenizer_dir = TOKENIZER_DIR
    saved_marker = META_FILE
    what = "DNA tokenizer"

    @classmethod
    def downstream_inputs(cls) -> type:
        from mmm.modalities.dna.downstream import DnaInputs

        return DnaInputs

    @classmethod
    def downstream_tasks(cls) -> Dict[str, Any]:
        from mmm.modalities.dna.downstream import dna_tasks

        return dna_tasks()

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__(model_cfg)
        self.cfg = model_cfg.dna
        if self.cfg.tokenizer not in DNA_TOKENIZERS:
            raise ValueError(f"model.dna.tokenizer must be one of {DNA_TOKENIZERS}, got {self.cfg.tokenizer!r}")
        if not 0.0 <= self.cfg.reverse_complement <= 1.0:
            raise ValueError(f"model.dna.reverse_complement must be a probability in [0, 1], "
                             f"got {self.cfg.reverse_complement}")
        if self.cfg.max_len < 3:
            raise ValueError(f"model.dna.max_len must be >= 3 ([CLS], one token, [SEP]), got {self.cfg.max_len}")
        self.tokenizer: Optional[DNATokenizer] = None

    # ------------------------------------------------------------------ the tokenizer (mmm.modalities.tokenizer_asset)

    def train_tokenizer(self, train_urls: List[str], options: Optional[ReadOptions]) -> DNATokenizer:
        return build_dna_tokenizer(self.cfg, train_urls, options)

    def check_reused(self, tok: DNATokenizer, own: Path) -> None:
        problem = describe_mismatch(tok, self.cfg)
        if problem:
            raise ValueError(f"the run folder's DNA tokenizer {own} does not match model.dna: {problem}; "
                             "use a new trainer.default_root_dir or delete that folder")

    def check_given(self, tok: DNATokenizer) -> None:
        problem = describe_mismatch(tok, self.cfg)
        if problem:
            logger.warning("model.dna.tokenizer_path %s is used as given although %s", self.cfg.tokenizer_path, problem)

    # ------------------------------------------------------------------ parts

    def build_masker(self, masking: ComponentConfig) -> Any:
        self.check_masker(masking.name)
        tok = self._tok()
        masker = self.create_masker(masking, vocab=tok.vocab())
        if masking.name == "dna_random" and isinstance(tok, DNAKmerTokenizer) and tok.overlapping and tok.k > 1:
            logger.warning("dna_random with overlapping %d-mers leaks: neighbouring k-mers spell a masked one; "
                           "dna_span masks whole base spans instead", tok.k)
        return masker

    def stages(self, masker: Any, *, batch_size: int, seed: int, handler: Handler, fixed_masking: bool,
               epochs: Optional[EpochCounter], train: bool, options: Optional[Dict[str, Any]] = None) -> List:
        self.reject_options(options)
        from mmm.modalities.dna.pipeline import dna_stages  # lazy: mmm.modalities.dna.pipeline imports the modalities package

        return dna_stages(self._tok(), masker, max_len=self.cfg.max_len, batch_size=batch_size, seed=seed,
                          handler=handler, fixed_masking=fixed_masking, epochs=epochs, train=train,
                          reverse_complement=self.cfg.reverse_complement, modality=self.name)

    def settings(self) -> Dict[str, Any]:
        return {"max_len": self.cfg.max_len, "reverse_complement": self.cfg.reverse_complement}
