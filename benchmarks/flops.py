"""Model FLOPs of one MLM training step of a BERT encoder, counted from its shape and its batch.

What a training step computes, in multiply-adds of its matrix products (2 FLOPs each), forward
and backward (the backward of a matrix product costs two of them, one for the input gradient and
one for the weight gradient: × 3 in all, the "6 N" rule of Kaplan et al. 2020):

* **linear layers of the encoder**, passed by every token: per block the query/key/value and
  output projections (4·d² weights) and the MLP (2·d·h), so ``6 · L · (4d² + 2dh)`` per token;
* **attention**, which has no weights: a token of a sequence of ``s`` tokens takes part in QKᵀ
  and in the weighted sum over V, 2·s·d multiply-adds each per block, so ``12 · L · d · s`` per
  token for forward + backward. A packed batch of lengths ``nᵢ`` costs ``12 · L · d · Σ nᵢ²``;
* **the MLM prediction head** at every position it predicts: its transform (d² weights) and the
  vocabulary projection (d·V), ``6 · (d² + d·V)`` per predicted position. HF ``BertForMaskedLM``
  predicts at every position of its blocks; mmm gathers the masked ~15% first.

Left out, as in the usual count: embedding lookups (no products), biases, LayerNorm, GELU,
softmax and the loss (element-wise, a few FLOPs per value), and the optimizer. These are the
*model* FLOPs of what each implementation computes, so a padded or full-sequence-logits
implementation is charged for that work; tokens/s × FLOPs/token is its achieved FLOP/s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

from torch import nn


@dataclass(frozen=True)
class BertShape:
    """The dimensions that set a BERT MLM's FLOPs.

    Args:
        dim: hidden size d (heads × head dim).
        depth: Transformer blocks L.
        mlp_hidden: MLP hidden size h.
        vocab: vocabulary size V (the output projection's rows).
    """

    dim: int
    depth: int
    mlp_hidden: int
    vocab: int

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "mlp_hidden", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertShape.{name} must be a positive int, got {value!r}")


def encoder_linear_weights(shape: BertShape) -> int:
    """Weights of the encoder's linear layers that every token passes: ``L · (4d² + 2dh)``."""
    d, h = shape.dim, shape.mlp_hidden
    return shape.depth * (4 * d * d + 2 * d * h)


def head_linear_weights(shape: BertShape) -> int:
    """Weights of the MLM head a predicted position passes: transform ``d²`` + vocabulary ``d·V``."""
    return shape.dim * shape.dim + shape.dim * shape.vocab


def step_flops(shape: BertShape, seqlens: Sequence[int], predicted: int) -> int:
    """Training (forward + backward) model FLOPs of one MLM step on a batch.

    Args:
        shape: the model's dimensions.
        seqlens: the length of every sequence the encoder attends within (a padded
            implementation passes its padded length for each row).
        predicted: positions the MLM head projects onto the vocabulary.
    """
    lengths = [int(n) for n in seqlens]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"step_flops needs sequences of at least one token, got {list(seqlens)[:8]}")
    if predicted < 0 or predicted > sum(lengths):
        raise ValueError(f"predicted positions must be in [0, {sum(lengths)}], got {predicted}")
    tokens = sum(lengths)
    linear = 6 * encoder_linear_weights(shape) * tokens
    attention = 12 * shape.depth * shape.dim * sum(n * n for n in lengths)
    head = 6 * head_linear_weights(shape) * int(predicted)
    return linear + attention + head


def step_flops_parts(shape: BertShape, seqlens: Sequence[int], predicted: int) -> Dict[str, int]:
    """:func:`step_flops` split into ``linear``, ``attention`` and ``head`` (the three terms)."""
    lengths = [int(n) for n in seqlens]
    return {"linear": 6 * encoder_linear_weights(shape) * sum(lengths),
            "attention": 12 * shape.depth * shape.dim * sum(n * n for n in lengths),
            "head": 6 * head_linear_weights(shape) * int(predicted)}


def linear_weights(module: nn.Module) -> int:
    """Weight entries of every ``nn.Linear`` in ``module`` (shared weights counted once); checks the
    counts above against a real model."""
    seen, total = set(), 0
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


def gemm_shapes(shape: BertShape, tokens: int, predicted: int) -> List[Tuple[int, int, int, int]]:
    """The matrix products of the step's linear layers as ``(m, k, n, count)``: ``count`` products of
    an (m × k) by a (k × n) matrix. For every linear layer with input width ``i``, output width ``o``
    and ``t`` rows: the forward (t × i)(i × o), the input gradient (t × o)(o × i) and the weight
    gradient (o × t)(t × i).

    Args:
        shape: the model's dimensions.
        tokens: rows through the encoder's linear layers.
        predicted: rows through the MLM head.
    """
    d, h, L = shape.dim, shape.mlp_hidden, shape.depth
    layers = [(tokens, d, 3 * d, L), (tokens, d, d, L), (tokens, d, h, L), (tokens, h, d, L)]
    if predicted:
        layers += [(predicted, d, d, 1), (predicted, d, shape.vocab, 1)]
    out: List[Tuple[int, int, int, int]] = []
    for t, i, o, count in layers:
        out += [(t, i, o, count), (t, o, i, count), (o, t, i, count)]
    return out


def gemm_flops(gemms: Iterable[Tuple[int, int, int, int]]) -> int:
    """``Σ 2·m·k·n·count`` over :func:`gemm_shapes` output."""
    return sum(2 * m * k * n * c for m, k, n, c in gemms)
