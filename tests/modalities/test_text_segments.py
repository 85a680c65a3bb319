"""Segment (token type) embeddings (BERT, Devlin et al. 2019): segments derived from [SEP] in packed ids, a
pretraining run that has them, and fine-tuning on sentence pairs against HF BertForSequenceClassification with
the token_type_ids its tokenizer gives."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmm.core.packing import PackedSeqInfo
from mmm.modalities.text.embedder import TextEmbedder
from tests.conftest import tiny_config

SEP = 3


def test_a_token_s_segment_counts_the_sep_tokens_before_it_in_its_own_sequence() -> None:
    seqs = [[2, 9, 9, SEP, 8, SEP],          # [CLS] a a [SEP] b [SEP]
            [2, 7, SEP],                     # one text: segment 0 throughout
            [2, 5, SEP, 6, SEP, 4, SEP, 4],  # a third [SEP]: capped at segments - 1
            [SEP, 5]]                        # a [SEP] first: the token after it is segment 1
    ids = torch.tensor([i for s in seqs for i in s])
    seq = PackedSeqInfo.from_seqlens([len(s) for s in seqs])
    two = TextEmbedder(20, 8, 16, segments=2, sep_id=SEP)
    assert two.segment_ids(ids, seq.position_ids).tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1]
    three = TextEmbedder(20, 8, 16, segments=3, sep_id=SEP)
    assert three.segment_ids(ids, seq.position_ids).tolist()[9:17] == [0, 0, 0, 1, 1, 2, 2, 2]
    one = TextEmbedder(20, 8, 16, segments=1, sep_id=SEP)  # RoBERTa's single type row: 0 everywhere
    assert one.segment_ids(ids, seq.position_ids).tolist() == [0] * len(ids)
    # the row each token gets is its segment's: the output moves with the table's row 1 only after a [SEP]
    two.eval()
    base = two(ids, seq.position_ids)
    with torch.no_grad():
        two.segments.weight[1] += torch.randn(8)  # not a constant vector: the LayerNorm would remove that
    moved = (two(ids, seq.position_ids) - base).abs().sum(-1) > 1e-6
    assert moved.tolist() == [s == 1 for s in two.segment_ids(ids, seq.position_ids).tolist()]


def test_segment_embeddings_need_the_sep_id() -> None:
    with pytest.raises(ValueError, match=r"segment embeddings need the tokenizer's \[SEP\] id in \[0, 20\), got None"):
        TextEmbedder(20, 8, 16, segments=2)
    with pytest.raises(ValueError, match=r"segments must be >= 0, got -1"):
        TextEmbedder(20, 8, 16, segments=-1)


@pytest.fixture(scope="module")
def segments_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step tiny text run with ``model.text.segments: 2``."""
    from mmm.train.pretrain import pretrain

    run_dir = tmp_path_factory.mktemp("segments_run")
    run = pretrain(tiny_config(run_dir, **{"trainer.max_steps": 3, "data.val": None, "model.text.segments": 2}))
    return run.last_checkpoint


def test_a_run_with_segments_trains_their_table_and_its_encoder_loads_with_it(segments_ckpt: Path) -> None:
    from mmm.encoders import load_encoder, read_checkpoint
    from mmm.model import init_weights

    enc = load_encoder(segments_ckpt)
    assert enc.config.text.segments == 2 and enc.embedder.sep_id == enc.tokenizer.sep_id
    table = read_checkpoint(segments_ckpt).state_dict["embedders.text.segments.weight"]
    assert torch.equal(enc.embedder.segments.weight.detach(), table)
    # pretraining texts are single segments: row 0 trains, row 1 keeps its initial N(0, 0.02) draw
    fresh = TextEmbedder(enc.vocab_size, enc.hidden_size, 64, segments=2, sep_id=enc.tokenizer.sep_id)
    init_weights(fresh)
    assert float(table[0].norm()) > 0 and float(table[1].std()) == pytest.approx(0.02, rel=0.5)


def test_pair_fine_tuning_with_segments_matches_hf_bert_for_sequence_classification(segments_ckpt: Path,
                                                                                     tmp_path: Path) -> None:
    """The same first training losses as HF on sentence pairs, HF given its tokenizer's token_type_ids (the
    segment table trains on both sides)."""
    transformers = pytest.importorskip("transformers")
    from mmm.downstream.data import read_table
    from mmm.downstream.finetune import batch_order
    from mmm.downstream.inputs import pad_ids
    from tests.downstream.helpers import finetune_parity_start, hf_first_losses, keyword_rows, write_table

    rows = keyword_rows(48, 0)
    pairs = [(a, b, label) for (a, label), (b, _) in zip(rows, rows[1:] + rows[:1])]
    train = read_table(write_table(tmp_path / "t.tsv", ["a", "b", "label"], pairs), ["a", "b"], "label")
    items, y, cfg, mmm_losses, hf, out = finetune_parity_start(segments_ckpt, train, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    batches, seen_types = [], set()
    for idx in batch_order(len(items), cfg.batch_size, 0, 0):
        ids, mask = pad_ids([items[i] for i in idx], hf.config.pad_token_id)
        enc = hf_tok([train.inputs[i][0] for i in idx], [train.inputs[i][1] for i in idx], padding=True,
                     return_tensors="pt")
        assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"].bool(), mask)
        seen_types |= set(enc["token_type_ids"].unique().tolist())
        batches.append(dict(enc, labels=torch.tensor([y[i] for i in idx])))
    hf_losses = hf_first_losses(hf, batches, cfg, int(np.ceil(len(items) / cfg.batch_size)), tmp_path)
    assert seen_types == {0, 1}
    np.testing.assert_allclose(mmm_losses, hf_losses, rtol=0, atol=2e-4)
    assert mmm_losses[0] != mmm_losses[-1]
