"""Fine-tuning parity: mmm's loop and HF ``BertForSequenceClassification`` on the exported encoder
(same seed, head weights, data order, optimizer, schedule and clipping; dropout off) give the same
first training losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmm.downstream.data import Labels, encode_labels, read_table
from mmm.downstream.finetune import ClassificationHead, FinetuneConfig, batch_order, train_one_seed
from mmm.downstream.inputs import load_adapter, pad_ids
from tests.downstream.helpers import hf_first_losses, keyword_rows, write_table

STEPS = 6


def test_first_training_losses_match_hf_bert_for_sequence_classification(ckpt: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from mmm.interop.hf import export_hf_bert

    train = read_table(write_table(tmp_path / "t.tsv", ["s", "label"], keyword_rows(48, 0)), ["s"], "label")
    y = encode_labels(train, Labels.fit(train, "classification"))
    adapter = load_adapter(str(ckpt), "text")
    items = [adapter.prepare(x) for x in train.inputs]
    cfg = FinetuneConfig(lr=1e-3, weight_decay=0.01, batch_size=8, epochs=1, warmup=0.2, dropout=0.0, seeds=1)
    make = lambda: load_adapter(str(ckpt), "text")  # noqa: E731
    mmm_losses = train_one_seed(make, (items, y), (items[:8], y[:8]), None, 2, cfg, seed=0, log=lambda s: None).first_losses

    # the same initial head, rebuilt from the same seed
    torch.manual_seed(0)
    make()
    head = ClassificationHead(adapter.hidden_size, 2, 0.0)
    export_hf_bert(adapter.encoder, tmp_path / "hf")
    hf = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "hf", num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    # the encoder has no segment table: the export's zero token-type table stays a constant, not a parameter
    hf.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)
    batches = []
    for idx in batch_order(len(items), cfg.batch_size, 0, 0):
        ids, mask = pad_ids([items[i] for i in idx], adapter.encoder.pad_id)
        batches.append(dict(input_ids=ids, attention_mask=mask.long(), labels=torch.tensor([y[i] for i in idx])))
    hf_losses = hf_first_losses(hf, head, batches, cfg, int(np.ceil(len(items) / cfg.batch_size)), tmp_path)
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
