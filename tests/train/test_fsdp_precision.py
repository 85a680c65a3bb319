"""FSDP under mixed precision: weights gathered in half precision, gradients reduced and buffers kept in fp32 (the
strategy is built here; running it needs CUDA)."""
from __future__ import annotations

import torch

from mmm.config import load_config
from mmm.train.pretrain import _strategy, fsdp_mixed_precision
from tests.conftest import REPO


def test_fsdp_bf16_mixed_reduces_gradients_and_keeps_buffers_in_fp32():
    """Lightning's bf16-mixed plugin gave FSDP bf16 gradient reduction and bf16 buffers (rotary inv_freq, ALiBi
    slopes), unlike the same run without FSDP."""
    cfg = load_config(REPO / "configs" / "text_mlm_bert_base_fsdp.yaml", {"trainer.default_root_dir": "unused"})
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.precision == "bf16-mixed"
    mp = _strategy(cfg, multi_task=False).mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    half = fsdp_mixed_precision("16-mixed")
    assert (half.param_dtype, half.reduce_dtype, half.buffer_dtype) == (torch.float16, torch.float32, torch.float32)
    assert fsdp_mixed_precision("32-true") is None and fsdp_mixed_precision("bf16-true") is None
