"""The model-FLOP counter of the end-to-end benchmark, against hand counts and real models' linear layers."""
from __future__ import annotations

import pytest
import torch

from benchmarks import flops
from benchmarks.flops import BertShape

TINY = BertShape(dim=128, depth=4, mlp_hidden=512, vocab=4096)


def test_tiny_step_by_hand():
    # Per block: QKV 3·128² + output 128² = 65,536; MLP 2·128·512 = 131,072; 4 blocks = 786,432 weights.
    assert flops.encoder_linear_weights(TINY) == 786_432
    # Head: transform 128² + vocabulary 128·4096 = 540,672 weights.
    assert flops.head_linear_weights(TINY) == 540_672
    # Two packed sequences of 128 and 64 tokens, 29 masked positions:
    # linear 6·786,432·192 = 905,969,664; attention 12·4·128·(128² + 64²) = 125,829,120;
    # head 6·540,672·29 = 94,076,928; total 1,125,875,712.
    assert flops.step_flops(TINY, [128, 64], 29) == 1_125_875_712
    assert flops.step_flops_parts(TINY, [128, 64], 29) == {
        "linear": 905_969_664, "attention": 125_829_120, "head": 94_076_928}


def test_bert_base_hf_block_by_hand():
    base = BertShape(dim=768, depth=12, mlp_hidden=3072, vocab=30522)
    # 12·(4·768² + 2·768·3072) = 84,934,656 encoder weights; head 768² + 768·30522 = 24,030,720.
    # One 128-token block with logits everywhere, per token: 6·84,934,656 + 12·12·768·128 + 6·24,030,720.
    per_token = 509_607_936 + 14_155_776 + 144_184_320
    assert flops.step_flops(base, [128], 128) == 128 * per_token == 128 * 667_948_032


def test_counts_match_the_linear_layers_of_real_models():
    transformers = pytest.importorskip("transformers")
    from mmm.config import EncoderConfig
    from mmm.core.encoder import TransformerEncoder

    shape = BertShape(dim=48, depth=3, mlp_hidden=80, vocab=211)
    enc = TransformerEncoder(EncoderConfig(dim=48, depth=3, heads=4, mlp_hidden=80, mlp="gelu", norm_first=False))
    assert flops.linear_weights(enc) == flops.encoder_linear_weights(shape)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=211, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80))
    assert flops.linear_weights(hf.bert.encoder) == flops.encoder_linear_weights(shape)
    assert flops.linear_weights(hf.cls) == flops.head_linear_weights(shape)  # the tied decoder counted once


def test_gemm_shapes_cover_the_linear_flops():
    gemms = flops.gemm_shapes(TINY, tokens=192, predicted=29)
    parts = flops.step_flops_parts(TINY, [128, 64], 29)
    assert flops.gemm_flops(gemms) == parts["linear"] + parts["head"]
    assert flops.gemm_flops(flops.gemm_shapes(TINY, tokens=192, predicted=0)) == parts["linear"]
    # QKV, once per block: forward (192 × 128)(128 × 384), input gradient (192 × 384)(384 × 128),
    # weight gradient (384 × 192)(192 × 128)
    assert gemms[:3] == [(192, 128, 384, 4), (192, 384, 128, 4), (384, 192, 128, 4)]
    assert gemms[-3:] == [(29, 128, 4096, 1), (29, 4096, 128, 1), (4096, 29, 128, 1)]  # the vocabulary projection


def test_errors():
    with pytest.raises(ValueError, match="dim"):
        BertShape(dim=0, depth=1, mlp_hidden=1, vocab=1)
    with pytest.raises(ValueError, match="predicted"):
        flops.step_flops(TINY, [4, 4], 9)
    with pytest.raises(ValueError, match="at least one token"):
        flops.step_flops(TINY, [], 0)


def test_linear_weights_counts_a_shared_weight_once():
    a = torch.nn.Linear(3, 5)
    b = torch.nn.Linear(3, 5)
    b.weight = a.weight
    assert flops.linear_weights(torch.nn.Sequential(a, b, torch.nn.Linear(5, 2))) == 15 + 10
