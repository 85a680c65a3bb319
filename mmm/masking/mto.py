"""Masked token optimisation (MTO; Choi et al. 2024, "Emerging Property of Masked Token for Effective
Pre-training", ECCV 2024).

The paper argues that a mask token should have *data singularity*: it stands for missing data and
carries none, so the visible tokens should not be built from it; letting every token attend to the
mask embeddings from the first layer on mixes a data-free vector into the visible tokens' features
and slows pre-training. Its remedy re-weights the attention so that the mask tokens are left out
of the early layers' attention ("weight recalibration"): the softmax is taken over the other keys
only, so the remaining weights are recalibrated to sum to one, and the mask tokens themselves gather
context from the visible tokens alone. The paper reports about half the pre-training epochs to
reach the baselines' converged accuracy (SimMIM, MAE-style and others, ViT-B/L).

Here, with ``model.encoder.mto_layers: N``, the first ``N`` blocks of the shared encoder see an
attention in which every token of the stream that holds a mask embedding is not a key (nor a value)
for any *other* token; it still attends to itself, and it reads every visible token. The later
blocks are the plain ones. It applies wherever a hidden input becomes a learned mask embedding in
the stream: images in mask-token mode (SimMIM / BEiT, ``model.image.drop_masked: false``), audio
frames, and hidden image-text regions or patches; a batch without such tokens runs the plain
encoder, and so do inference and export (nothing is masked there). The paper's own schedule of
which layers to recalibrate, and its additional loss terms, are not reproduced: ``N`` is the knob.

Mechanics: the first ``N`` blocks run the block's own weights through :func:`keymasked_block`,
which is :class:`~mmm.core.encoder.EncoderBlock`'s forward with an explicit key mask in the
attention (PyTorch SDPA on the padded layout, the ALiBi bias or rotary tables applied as the core
does); a test checks that with nothing masked it equals the core block.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from mmm.batch import FeatureInput, ImageInput, PackedBatch, RegionInput
from mmm.core.attention import attend, bias_dtype
from mmm.core.encoder import EncoderBlock, SelfAttention, TransformerEncoder
from mmm.core.packing import PackedSeqInfo
from mmm.core.position import apply_rotary


def mask_token_rows(batch: PackedBatch, embedders: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """(N,) bool, True at the stream rows whose input was replaced by a mask embedding; None when
    the batch has none (text ids are not covered: a [MASK] id is an ordinary token to the embedder).

    Args:
        batch: the packed batch.
        embedders: the model's embedders by input name (an image embedder gives its [CLS] count).
    """
    flags, hidden = None, 0  # hidden: the rows' count from the inputs' host counts; None once one is unknown
    for name, inp in batch.inputs.items():
        rows = _input_rows(inp, embedders[name] if name in embedders else None)
        if rows is None:
            continue
        if flags is None:
            flags = torch.zeros(batch.num_tokens, dtype=torch.bool, device=rows.device)
        index = getattr(inp, "index", None)
        flags[rows if index is None else index[rows]] = True
        count = getattr(inp, "hidden_count", None)
        hidden = None if hidden is None or count is None else hidden + count
    if flags is None or hidden == 0 or (hidden is None and not bool(flags.any())):
        return None
    return flags


def _input_rows(inp: Any, embedder: Any) -> Optional[torch.Tensor]:
    """Rows, within one input's own tokens, that hold its mask embedding (None: none do)."""
    if isinstance(inp, ImageInput):
        if inp.mask is None or inp.drop_masked:
            return None
        prefix = int(getattr(embedder, "num_prefix_tokens", 0))
        return inp.hidden_token_rows(prefix)  # in (B, prefix + P); no device read with a host count
    if isinstance(inp, (FeatureInput, RegionInput)):
        return None if inp.mask is None else inp.hidden_positions()
    return None


def keymasked_attention(attn: SelfAttention, x: torch.Tensor, seq: PackedSeqInfo, is_key: torch.Tensor,
                        bias: Any, rope: Any) -> torch.Tensor:
    """``attn``'s forward with the tokens where ``is_key`` is False removed from the other tokens' keys.

    Args:
        attn: the block's :class:`~mmm.core.encoder.SelfAttention`.
        x: (N, d) block input (after the pre-norm, if any).
        seq: the batch layout.
        is_key: (N,) bool, False = this token is a key only for itself.
        bias: the encoder's ALiBi module or None.
        rope: the encoder's rotary tables or None.
    """
    n = x.shape[0]
    q, k, v = attn.qkv(x).view(n, 3, attn.heads, attn.head_dim).unbind(1)  # (N, H, D) each
    if rope is not None:
        q, k = apply_rotary(q, k, *rope)
    qp, kp, vp = (seq.pad(t).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    t = seq.max_seqlen
    keys = seq.pad(is_key[:, None]).squeeze(-1)  # (B, T); padding → False
    self_key = torch.eye(t, dtype=torch.bool, device=x.device)  # (T, T)
    allowed = keys[:, None, None, :] | self_key[None, None]  # (B, 1, T, T): other keys, or oneself
    if bias is not None:
        mask = bias.bias(t, bias_dtype(qp)).masked_fill(~allowed, float("-inf"))  # (B, H, T, T)
    else:
        mask = allowed
    dropout = attn.attn_dropout if attn.training else 0.0
    out = attend(qp, kp, vp, mask, dropout)  # (B, H, T, D); every row sees at least itself
    return attn.proj(seq.unpad(out.transpose(1, 2)).reshape(n, -1))  # (N, d)


def keymasked_block(block: EncoderBlock, x: torch.Tensor, seq: PackedSeqInfo, is_key: torch.Tensor, bias: Any,
                    rope: Any, route: Any = None) -> torch.Tensor:
    """:class:`~mmm.core.encoder.EncoderBlock`'s forward with :func:`keymasked_attention`."""
    mlp = block.mlp if route is None else (lambda h: block.mlp(h, route))
    if block.norm_first:
        x = x + block.dropout(keymasked_attention(block.attn, block.norm1(x), seq, is_key, bias, rope))
        return x + block.dropout(mlp(block.norm2(x)))
    x = block.norm1(x + block.dropout(keymasked_attention(block.attn, x, seq, is_key, bias, rope)))
    return block.norm2(x + block.dropout(mlp(x)))


def encode_with_mto(encoder: TransformerEncoder, x: torch.Tensor, seq: PackedSeqInfo, mask_rows: torch.Tensor,
                    layers: int, modality: Any = None) -> torch.Tensor:
    """The encoder's forward with its first ``layers`` blocks blind to the mask-token rows (MTO).

    Args:
        encoder: the shared encoder.
        x: (N, d) embedded stream.
        seq: its layout.
        mask_rows: (N,) bool, True = the token is a mask embedding (:func:`mask_token_rows`).
        layers: how many leading blocks exclude those tokens from the other tokens' keys.
        modality: as for :meth:`TransformerEncoder.forward` (modality experts).
    """
    if not 0 < layers <= len(encoder.blocks):
        raise ValueError(f"model.encoder.mto_layers must lie in [1, depth {len(encoder.blocks)}] here, got {layers}")
    if encoder.alibi is not None and encoder.rotary is not None:
        raise ValueError("MTO: an encoder with both ALiBi and rotary positions is not supported")
    rope = encoder.rotary.tables(seq.position_ids) if encoder.rotary is not None else None
    bias = encoder.alibi
    route = encoder.route(modality)
    backend = encoder.backend_for(x.device)
    plain_bias = bias
    if backend == "flex":
        from mmm.core.attention import flex_context

        plain_bias = flex_context(seq, encoder.alibi)
    is_key = ~mask_rows
    for i, block in enumerate(encoder.blocks):
        if i < layers:
            x = keymasked_block(block, x, seq, is_key, bias, rope, route)
        elif route is None:
            x = block(x, seq, backend, plain_bias, rope)
        else:
            x = block(x, seq, backend, plain_bias, rope, route)
    if encoder.final_norm is not None:
        x = encoder.final_norm(x)
    return x
