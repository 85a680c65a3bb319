"""The text modality in a run: a WordPiece/BPE tokenizer as its asset, token maskers, MLM batches."""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from mmm.config import ComponentConfig, ConfigError, ModelConfig, TextConfig
from mmm.data.epoch import EpochCounter
from mmm.data.tar import ReadOptions
from mmm.modalities.text.pipeline import text_stages
from mmm.modalities.text.codec import iter_texts
from mmm.encoders import TokenEncoderParts
from mmm.modalities.base import Handler, Modality
from mmm.modalities.tokenizer_asset import FIT_FILE, TokenizerAsset
from mmm.modalities.text.tokenizer import TextTokenizer
from mmm.registry import MODALITIES, TOKENIZERS

logger = logging.getLogger("mmm.train")

TOKENIZER_DIR = "tokenizer"


@MODALITIES.register("text")
class TextModality(TokenizerAsset, TokenEncoderParts, Modality):
    """Text (BERT-style MLM): tokenizer loaded, reused from the run folder, or trained on the shards."""

    name = "text"
    order = 10
    config_class = TextConfig
    asset_settings = ("tokenizer", "vocab_size", "lowercase", "tokenizer_train_docs")  # tokenizer_path: may name the same one
    config_help = "text modality"
    masks = ("token",)
    masks_what = "text tokens"
    load_tokenizer = staticmethod(TextTokenizer.load)
    tokenizer_dir = TOKENIZER_DIR
    saved_marker = "tokenizer.json"

    @classmethod
    def downstream_inputs(cls) -> type:
        from mmm.modalities.text.downstream import TextInputs

        return TextInputs

    @classmethod
    def downstream_tasks(cls) -> Dict[str, Any]:
        from mmm.modalities.text.downstream import text_tasks

        return text_tasks()

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__(model_cfg)
        self.cfg = model_cfg.text
        self.tokenizer: Optional[TextTokenizer] = None

    # ------------------------------------------------------------------ the tokenizer (mmm.modalities.tokenizer_asset)

    def train_tokenizer(self, train_urls: List[str], options: Optional[ReadOptions]) -> TextTokenizer:
        t = self.cfg
        logger.info("training a %s tokenizer (vocab %d) on up to %d documents", t.tokenizer, t.vocab_size,
                    t.tokenizer_train_docs)
        texts = itertools.islice(iter_texts(train_urls, options=options), t.tokenizer_train_docs)
        return TOKENIZERS.create(t.tokenizer, texts=texts, vocab_size=t.vocab_size, lowercase=t.lowercase)

    def fit_record(self) -> Dict[str, Any]:
        return {"tokenizer": self.cfg.tokenizer, "vocab_size": self.cfg.vocab_size, "lowercase": self.cfg.lowercase}

    def check_reused(self, tok: TextTokenizer, own: Path) -> None:
        """Refuse the run folder's tokenizer when ``model.text`` asks for another one (algorithm,
        vocabulary size or casing), naming both values and the folder."""
        t, fit_path = self.cfg, own / FIT_FILE
        fit: Dict[str, Any] = {"tokenizer": tok.kind, "lowercase": tok.lowercase}
        if fit_path.is_file():
            try:
                fit.update(json.loads(fit_path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {fit_path}: {e}") from None
        trained = fit.get("vocab_size")
        problems = [f"model.text.{k} is {getattr(t, k)!r} but it was trained with {fit[k]!r}"
                    for k in ("tokenizer", "lowercase") if fit[k] != getattr(t, k)]
        if trained is not None and trained != t.vocab_size:
            problems.append(f"model.text.vocab_size is {t.vocab_size} but it was trained with vocab_size {trained} "
                            f"({tok.vocab_size} tokens)")
        elif trained is None and tok.vocab_size > t.vocab_size:  # a folder from before the fit record
            problems.append(f"model.text.vocab_size is {t.vocab_size} but it holds {tok.vocab_size} tokens")
        if problems:
            raise ConfigError(f"the run folder's tokenizer {own / 'tokenizer.json'} is not the one the config asks for: "
                             f"{'; '.join(problems)}. Keep the run's settings, use a new trainer.default_root_dir, "
                             f"or delete {own} to train a new tokenizer")

    def build_masker(self, masking: ComponentConfig) -> Any:
        return self.create_masker(masking, vocab=self._tok().vocab())

    def stages(self, masker: Any, *, batch_size: int, seed: int, handler: Handler, fixed_masking: bool,
               epochs: Optional[EpochCounter], train: bool, options: Optional[Dict[str, Any]] = None) -> List:
        self.reject_options(options)
        return text_stages(self._tok(), masker, max_len=self.cfg.max_len, batch_size=batch_size, seed=seed,
                           handler=handler, fixed_masking=fixed_masking, epochs=epochs, modality=self.name)

    def settings(self) -> Dict[str, Any]:
        return {"max_len": self.cfg.max_len}

    # ------------------------------------------------------------------ standalone encoder

    @classmethod
    def load_foreign_encoder(cls, source: Path, **options: Any) -> Optional[nn.Module]:
        """An HF BERT folder (``config.json`` + weights), through :func:`mmm.interop.hf.import_hf_bert`."""
        super().load_foreign_encoder(source, **options)
        if source.is_dir() and (source / "config.json").is_file():
            from mmm.interop.hf import import_hf_bert

            return import_hf_bert(source)
        return None
