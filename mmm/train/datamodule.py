"""Streaming DataModule: WebDataset shards → packed, masked batches."""
from __future__ import annotations

from typing import List, Optional

import lightning as L
from torch.utils.data import DataLoader

from mmm.config import DataConfig
from mmm.data.stream import SampleErrorHandler, make_pipeline
from mmm.data.text import text_stages
from mmm.masking.base import TokenMasker
from mmm.modalities.text_tokenizer import TextTokenizer


class TextDataModule(L.LightningDataModule):
    """Train/val loaders over text shards; tokenization, masking and packing run in the workers.

    Args:
        cfg: data settings.
        train_urls: training shard urls.
        val_urls: validation shard urls (None = no validation).
        tokenizer: trained tokenizer.
        masker: token masker.
        max_len: longest sequence in tokens.
    """

    def __init__(self, cfg: DataConfig, train_urls: List[str], val_urls: Optional[List[str]],
                 tokenizer: TextTokenizer, masker: TokenMasker, max_len: int) -> None:
        super().__init__()
        self.cfg, self.train_urls, self.val_urls = cfg, train_urls, val_urls
        self.tokenizer, self.masker, self.max_len = tokenizer, masker, max_len

    def _loader(self, urls: List[str], train: bool) -> DataLoader:
        c = self.cfg
        handler = SampleErrorHandler(skip_bad=c.skip_bad, max_errors=c.max_errors)
        stages = text_stages(self.tokenizer, self.masker, max_len=self.max_len, batch_size=c.batch_size,
                             seed=c.seed if train else c.seed + 10_000, handler=handler, fixed_masking=not train)
        pipeline = make_pipeline(urls, stages=stages, shuffle_shards=train and c.shuffle_shards,
                                 shuffle_buffer=c.shuffle_buffer if train else 0, seed=c.seed, handler=handler)
        workers = min(c.num_workers, len(urls)) if train else 0
        return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers > 0 else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True)

    def val_dataloader(self) -> DataLoader:
        if not self.val_urls:
            return []
        return self._loader(self.val_urls, train=False)
