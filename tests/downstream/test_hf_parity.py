"""Fine-tuning parity: mmm's loop and HF ``BertForSequenceClassification`` on the exported encoder
(same seed, head weights, data order, optimizer, schedule and clipping; dropout off) give the same
first training losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmm.downstream.data import read_table
from mmm.downstream.finetune import batch_order
from mmm.downstream.inputs import pad_ids
from tests.downstream.helpers import finetune_parity_start, hf_first_losses, keyword_rows, write_table

STEPS = 6


def test_first_training_losses_match_hf_bert_for_sequence_classification(ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    train = read_table(write_table(tmp_path / "t.tsv", ["s", "label"], keyword_rows(48, 0)), ["s"], "label")
    items, y, cfg, mmm_losses, hf, _ = finetune_parity_start(ckpt, train, tmp_path)
    # the encoder has no segment table: the export's zero token-type table stays a constant, not a parameter
    hf.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)
    batches = []
    for idx in batch_order(len(items), cfg.batch_size, 0, 0):
        ids, mask = pad_ids([items[i] for i in idx], hf.config.pad_token_id)
        batches.append(dict(input_ids=ids, attention_mask=mask.long(), labels=torch.tensor([y[i] for i in idx])))
    hf_losses = hf_first_losses(hf, batches, cfg, int(np.ceil(len(items) / cfg.batch_size)), tmp_path)
    assert len(mmm_losses) == len(hf_losses) == STEPS
    np.testing.assert_allclose(mmm_losses, hf_losses, rtol=0, atol=2e-4)
    assert mmm_losses[0] != mmm_losses[-1]  # the weights did move: later losses compare updated models


def test_the_warmup_step_count_is_hf_trainer_s(tmp_path):
    """mmm rounded the warmup steps (6 of 63 at 0.1) where HF Trainer rounds up (7)."""
    transformers = pytest.importorskip("transformers")
    from mmm.downstream.finetune import warmup_steps

    for ratio in (0.06, 0.1, 0.2, 0.33):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "args"), warmup_steps=ratio)
        assert [warmup_steps(t, ratio) for t in range(1, 300)] == [args.get_warmup_steps(t) for t in range(1, 300)]
