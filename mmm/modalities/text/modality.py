"""The text modality in a run: a WordPiece/BPE tokenizer as its asset, token maskers, MLM batches."""
from __future__ import annotations

import itertools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from mmm.config import ComponentConfig, ConfigError, EncoderConfig, ModelConfig, TextConfig
from mmm.data.epoch import EpochCounter
from mmm.data.tar import ReadOptions
from mmm.modalities.text.pipeline import text_stages
from mmm.modalities.text.codec import iter_texts
from mmm.encoders import TokenEncoderParts
from mmm.modalities.base import Handler, Modality
from mmm.modalities.text.tokenizer import TextTokenizer
from mmm.registry import EMBEDDERS, MODALITIES, TOKENIZERS

logger = logging.getLogger("mmm.train")

TOKENIZER_DIR = "tokenizer"
FIT_FILE = "fitted_with.json"
"""Settings a run-folder tokenizer was trained with (compared when the folder is reused)."""


def tokenizer_files(directory: Path) -> Dict[str, str]:
    """The text files of a saved tokenizer (embedded in checkpoints so they are self-contained)."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.iterdir()) if p.is_file()}


def tokenizer_from_files(files: Dict[str, str], where: str) -> TextTokenizer:
    """Rebuild a tokenizer from :func:`tokenizer_files` output."""
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError(f"{where}: tokenizer files must map file names to file text")
    with tempfile.TemporaryDirectory(prefix="mmm_tok_") as tmp:
        for name, text in files.items():
            if Path(name).name != name:
                raise ValueError(f"{where}: tokenizer file name {name!r} is not a plain file name")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        try:
            return TextTokenizer.load(tmp)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{where}: the embedded tokenizer cannot be loaded: {e}") from None


@MODALITIES.register("text")
class TextModality(TokenEncoderParts, Modality):
    """Text (BERT-style MLM): tokenizer loaded, reused from the run folder, or trained on the shards."""

    name = "text"
    order = 10
    config_class = TextConfig
    config_help = "text modality"
    masks = ("token",)
    masks_what = "text tokens"
    load_tokenizer = staticmethod(TextTokenizer.load)

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__(model_cfg)
        self.cfg = model_cfg.text
        self.tokenizer: Optional[TextTokenizer] = None

    def prepare(self, train_urls: List[str], run_dir: Path, options: Optional[ReadOptions] = None) -> None:
        """Load ``model.text.tokenizer_path``, reuse the run folder's tokenizer, or train one; a reused
        tokenizer must be the one the config asks for (it is refused, naming both, otherwise)."""
        t, own = self.cfg, run_dir / TOKENIZER_DIR
        reuse = (own / "tokenizer.json").is_file()
        if t.tokenizer_path:
            tok = TextTokenizer.load(t.tokenizer_path)
            if reuse and TextTokenizer.load(own).tokenizer.get_vocab() != tok.tokenizer.get_vocab():
                raise ConfigError(f"model.text.tokenizer_path {t.tokenizer_path} differs from the tokenizer the run folder "
                                 f"already holds ({own}); use a new trainer.default_root_dir or delete {own}")
        elif reuse:
            tok = TextTokenizer.load(own)
            self._check_reused(tok, own)
        else:
            logger.info("training a %s tokenizer (vocab %d) on up to %d documents", t.tokenizer, t.vocab_size,
                        t.tokenizer_train_docs)
            texts = itertools.islice(iter_texts(train_urls, options=options), t.tokenizer_train_docs)
            tok = TOKENIZERS.create(t.tokenizer, texts=texts, vocab_size=t.vocab_size, lowercase=t.lowercase)
        if not reuse:
            tok.save(own)
            if not t.tokenizer_path:
                fit = {"tokenizer": t.tokenizer, "vocab_size": t.vocab_size, "lowercase": t.lowercase}
                (own / FIT_FILE).write_text(json.dumps(fit, indent=2) + "\n", encoding="utf-8")
        self.tokenizer = tok
        self._files = tokenizer_files(own)

    def _check_reused(self, tok: TextTokenizer, own: Path) -> None:
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

    def assets(self) -> Dict[str, str]:
        return dict(self._files) if self.tokenizer is not None else {}

    def load_assets(self, files: Dict[str, str], where: str) -> None:
        self.tokenizer = tokenizer_from_files(files, where)
        self._files = dict(files)

    def _tok(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("text modality: call prepare() or load_assets() first (no tokenizer yet)")
        return self.tokenizer

    def build_embedder(self, encoder_cfg: EncoderConfig) -> nn.Module:
        t, tok = self.cfg, self._tok()
        return EMBEDDERS.create("text", vocab_size=tok.vocab_size, dim=encoder_cfg.dim, max_len=t.max_len,
                                position=t.position, embed_norm=t.embed_norm, norm_eps=encoder_cfg.norm_eps,
                                dropout=encoder_cfg.dropout, pad_id=tok.pad_id)

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
