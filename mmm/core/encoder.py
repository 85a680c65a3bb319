"""The shared Transformer encoder over packed sequences.

One class expresses BERT (post-LayerNorm, GELU MLP; Devlin et al. 2019), ViT (pre-LayerNorm,
final norm; Dosovitskiy et al. 2021) and MosaicBERT-style variants (gated GLU/GeGLU/SwiGLU MLPs
from Shazeer 2020, ALiBi or rotary positions) purely through :class:`~mmm.config.EncoderConfig`.
Tokens arrive packed as (N, d) with a :class:`~mmm.core.packing.PackedSeqInfo`; all linear
layers touch only real tokens. ``forward(..., causal=True)`` runs the same weights as a causal
(left-to-right) encoder: every token attends only to itself and the earlier tokens of its own
sequence, in every attention backend (for causal language modelling, e.g. a CLM phase before MLM).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mmm.config import EncoderConfig
from mmm.core.attention import FlexContext, flex_context, resolve_backend
from mmm.core.dropout import Dropout
from mmm.core.output_rows import OutputRows, attend_rows
from mmm.core.packing import LongestFirst, PackedSeqInfo, mask_positions
from mmm.core.position import RELATIVE_POSITIONS, ALiBi, Rotary, apply_rotary, rotate
from mmm.registry import ATTENTION_BACKENDS

MLP_KINDS = ("gelu", "glu", "geglu", "swiglu")
_GATES = {"glu": torch.sigmoid, "geglu": F.gelu, "swiglu": F.silu}
RopeTables = Tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin), each (N, 1, D), from Rotary.tables
AttentionBias = Union[None, ALiBi, FlexContext]  # what the backend applies (the flex backend's per-batch context)
Route = Union[None, int, List[torch.Tensor]]  # modality experts: one expert for all tokens, or each expert's token rows


class TokenModality(NamedTuple):
    """Each token's modality index with every expert's token count, counted on the host (the inputs'
    sizes): the experts' rows are then found with no device read (:meth:`TransformerEncoder.route`)."""

    ids: torch.Tensor  # (N,) int64
    counts: Tuple[int, ...]  # tokens of each modality index


def _pick(modality, index: torch.Tensor, keeps_counts: bool):
    """``modality`` at the rows ``index``: a permutation keeps a :class:`TokenModality`'s counts, a subset does not."""
    if isinstance(modality, TokenModality):
        ids = modality.ids.index_select(0, index)
        return modality._replace(ids=ids) if keeps_counts else ids
    return modality.index_select(0, index) if isinstance(modality, torch.Tensor) else modality


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = cfg.attn_dropout

    def forward(self, x: torch.Tensor, seq: PackedSeqInfo, backend: str,
                bias: AttentionBias, rope: Optional[RopeTables], causal: bool = False) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).unbind(1)  # (N, H, D) each
        if rope is not None:
            q, k = apply_rotary(q, k, *rope)
        out = ATTENTION_BACKENDS.get(backend)(q, k, v, seq, bias, self.attn_dropout if self.training else 0.0,
                                              causal=causal)
        return self.proj(out.reshape(n, -1))  # (N, d)

    def forward_rows(self, x: torch.Tensor, seq: PackedSeqInfo, rows: OutputRows, alibi: Optional[ALiBi],
                     rope: Optional[RopeTables], causal: bool = False) -> torch.Tensor:
        """The attention output of ``rows`` only: their queries over every token's keys/values, (N, d) → (M, d).

        ``rope``: the stream's rotary tables (batch order) or None; ``alibi``: the ALiBi module or None.
        """
        n, d = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(x, weight[d:], None if bias is None else bias[d:])  # (N, 2d): keys and values of every token
        k, v = kv.view(n, 2, self.heads, self.head_dim).unbind(1)
        q = F.linear(x.index_select(0, rows.index), weight[:d], None if bias is None else bias[:d])
        q = q.view(-1, self.heads, self.head_dim)  # (M, H, D)
        if rope is not None:
            cos, sin = rope
            q, k = rotate(q, cos.index_select(0, rows.index), sin.index_select(0, rows.index)), rotate(k, cos, sin)
        out = attend_rows(q, k, v, seq, rows, alibi, self.attn_dropout if self.training else 0.0, causal)
        return self.proj(out.reshape(len(rows), -1))  # (M, d)


class MLP(nn.Module):
    """Position-wise MLP: GELU (BERT/ViT) or a gated linear unit (Shazeer 2020)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.mlp not in MLP_KINDS:
            raise ValueError(f"unknown mlp kind {cfg.mlp!r}; expected one of {MLP_KINDS}")
        hidden = cfg.mlp_hidden or 4 * cfg.dim
        self.kind = cfg.mlp
        self.fc1 = nn.Linear(cfg.dim, hidden * (1 if cfg.mlp == "gelu" else 2))
        self.fc2 = nn.Linear(hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        else:
            value, gate = h.chunk(2, dim=-1)
            h = value * _GATES[self.kind](gate)
        return self.fc2(h)


class ModalityExperts(nn.Module):
    """One :class:`MLP` per modality (VLMo's mixture of modality experts, Bao et al. 2022; ONE-PEACE,
    Wang et al. 2023): each token passes only the feed-forward network of its own modality."""

    def __init__(self, cfg: EncoderConfig, count: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(count))

    def forward(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """(N, d) → (N, d); ``route``: one expert index for every token, or each expert's (N_k,) rows."""
        if route is None:
            raise ValueError("this encoder has modality experts: pass each token's modality (encoder(x, seq, modality=...))")
        if isinstance(route, int):
            return self.experts[route](x)
        out = x.new_zeros(x.shape)
        for expert, rows in zip(self.experts, route):  # an expert with no token still joins the graph (DDP)
            out = out.index_copy(0, rows, expert(x.index_select(0, rows)))
        return out


class EncoderBlock(nn.Module):
    """Attention + MLP with residuals, pre- or post-LayerNorm; ``experts`` > 0: one MLP per modality."""

    def __init__(self, cfg: EncoderConfig, experts: int = 0) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.attn = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = ModalityExperts(cfg, experts) if experts else MLP(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, seq: PackedSeqInfo, backend: str, bias: AttentionBias,
                rope: Optional[RopeTables], route: Route = None, causal: bool = False,
                rows: Optional[OutputRows] = None) -> torch.Tensor:
        """(N, d) → (N, d); with ``rows``, (N, d) → (M, d) at those rows only (:meth:`forward_rows`; ``bias``
        is then the ALiBi module or None). Both go through ``forward``, so FSDP and compile wrappers see them."""
        if rows is not None:
            return self.forward_rows(x, seq, rows, bias, rope, route, causal)
        mlp = self.mlp if route is None else lambda h: self.mlp(h, route)
        if self.norm_first:
            x = x + self.dropout(self.attn(self.norm1(x), seq, backend, bias, rope, causal))
            return x + self.dropout(mlp(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attn(x, seq, backend, bias, rope, causal)))
        return self.norm2(x + self.dropout(mlp(x)))

    def forward_rows(self, x: torch.Tensor, seq: PackedSeqInfo, rows: OutputRows, alibi: Optional[ALiBi],
                     rope: Optional[RopeTables], route: Route = None, causal: bool = False) -> torch.Tensor:
        """This block's output at ``rows`` only, (N, d) → (M, d) (every token still serves as key/value)."""
        mlp = self.mlp if route is None else lambda h: self.mlp(h, route)
        picked = x.index_select(0, rows.index)  # (M, d)
        if self.norm_first:
            picked = picked + self.dropout(self.attn.forward_rows(self.norm1(x), seq, rows, alibi, rope, causal))
            return picked + self.dropout(mlp(self.norm2(picked)))
        picked = self.norm1(picked + self.dropout(self.attn.forward_rows(x, seq, rows, alibi, rope, causal)))
        return self.norm2(picked + self.dropout(mlp(picked)))


class TransformerEncoder(nn.Module):
    """Stack of :class:`EncoderBlock` over a packed batch.

    Args:
        cfg: the encoder configuration.
        experts: number of modality experts (one MLP per modality in every block, chosen by each
            token's modality; :class:`~mmm.model.MaskedModel` passes ``len(embedders)`` when
            ``cfg.experts`` is set); 0 = one shared MLP (a standalone encoder, experts folded).
    """

    def __init__(self, cfg: EncoderConfig, experts: int = 0) -> None:
        super().__init__()
        if experts < 0:
            raise ValueError(f"experts must be >= 0, got {experts}")
        if cfg.dim % cfg.heads:
            raise ValueError(f"encoder.dim={cfg.dim} is not divisible by encoder.heads={cfg.heads}")
        if cfg.relative_position not in RELATIVE_POSITIONS:
            raise ValueError(f"unknown encoder.relative_position {cfg.relative_position!r}; expected one of {RELATIVE_POSITIONS}")
        if cfg.attention != "auto":
            ATTENTION_BACKENDS.get(cfg.attention)
        if cfg.attention == "flex" and cfg.attn_dropout > 0:
            raise ValueError(f"encoder.attention=flex has no attention dropout; set encoder.attn_dropout: 0 "
                             f"(got {cfg.attn_dropout})")
        self.cfg = cfg
        self.experts = int(experts)
        self.blocks = nn.ModuleList(EncoderBlock(cfg, experts) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else None
        self.alibi = ALiBi(cfg.heads) if cfg.relative_position == "alibi" else None
        self.rotary = Rotary(cfg.dim // cfg.heads) if cfg.relative_position == "rotary" else None
        self._resolved: Tuple[Optional[tuple], Optional[str]] = (None, None)
        self._resolve_for_parameters()

    def _resolve_for_parameters(self) -> None:
        """Resolve the backend for the device the weights are on (at build time and after every move)."""
        first = next(self.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        try:
            self._resolved = ((self.cfg.attention, device.type), self.backend_for(device))
        except (RuntimeError, ValueError, KeyError):  # e.g. xformers asked for on CPU: raised by the first forward
            self._resolved = (None, None)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._resolve_for_parameters()
        return out

    def backend_for(self, device: torch.device) -> str:
        """The attention backend this encoder uses on ``device`` (resolved once per config value and device)."""
        key, name = self._resolved
        if key == (self.cfg.attention, device.type):
            return name
        return resolve_backend(self.cfg.attention, device, has_bias=self.alibi is not None)

    def route(self, modality: Union[None, int, torch.Tensor, TokenModality], n_tokens: Optional[int] = None,
              check_values: bool = True) -> Route:
        """What the blocks' modality experts read: None without experts, else one expert index or,
        for a (N,) tensor of per-token modality indices, each expert's rows (computed once per batch;
        with a :class:`TokenModality`'s host counts, without a device read). Every token must belong to
        one expert (a token no expert claims would skip the MLP): shapes and counts are checked on the
        host; a plain tensor's values too when it is on the CPU and ``check_values`` (a training step's
        :class:`TokenModality` is built by the model from its inputs' sizes and is never read back)."""
        if not self.experts:
            return None
        if isinstance(modality, TokenModality):
            if len(modality.counts) != self.experts:
                raise ValueError(f"{len(modality.counts)} modality token counts for {self.experts} experts")
            tokens = modality.ids.shape[0]
            if sum(modality.counts) != tokens or (n_tokens is not None and tokens != n_tokens):
                raise ValueError(f"the modality token counts {list(modality.counts)} (sum {sum(modality.counts)}) and "
                                 f"the {tokens} per-token modality indices must both cover the "
                                 f"{n_tokens if n_tokens is not None else tokens} tokens")
            return [mask_positions(modality.ids == k, n) for k, n in enumerate(modality.counts)]
        if modality is None:
            raise ValueError(f"this encoder has {self.experts} modality experts: pass each token's modality index "
                             f"(an int for a single-modality stream, or an (N,) tensor)")
        if isinstance(modality, int):
            if not 0 <= modality < self.experts:
                raise ValueError(f"modality index {modality} out of range for {self.experts} experts")
            return modality
        if modality.dim() != 1 or (n_tokens is not None and modality.shape[0] != n_tokens):
            raise ValueError(f"modality must be an int or one index per token, ({n_tokens},); got shape "
                             f"{tuple(modality.shape)}")
        if check_values:
            self._check_expert_ids(modality)
        return [(modality == k).nonzero().squeeze(1) for k in range(self.experts)]

    def _check_expert_ids(self, ids: torch.Tensor) -> None:
        """Per-token modality indices on the CPU lie in ``[0, experts)`` (on a GPU the read would cost a sync)."""
        if ids.device.type == "cpu" and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.experts):
            raise ValueError(f"per-token modality indices must lie in [0, {self.experts}) (one per expert); got "
                             f"values from {int(ids.min())} to {int(ids.max())}")

    def _check_input(self, x: torch.Tensor, seq: PackedSeqInfo) -> None:
        """``x`` is (N, dim) for the N tokens of ``seq`` (host shapes: no device read)."""
        if x.dim() != 2 or x.shape[0] != seq.num_tokens or x.shape[1] != self.cfg.dim:
            raise ValueError(f"the encoder takes (tokens, dim) = ({seq.num_tokens}, {self.cfg.dim}) for a layout of "
                             f"{seq.num_tokens} tokens in {seq.batch_size} sequences; got x of shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, seq: PackedSeqInfo,
                modality: Union[None, int, torch.Tensor] = None, causal: bool = False,
                rows: Optional[OutputRows] = None) -> torch.Tensor:
        """(N, d) packed embeddings → (N, d) packed hidden states, or (M, d) at ``rows``.

        Args:
            x: (N, d) tokens.
            seq: their layout.
            modality: with modality experts, each token's modality index (an int for all, or (N,) int64).
            causal: each token attends only to itself and the earlier tokens of its own sequence
                (causal language modelling); False = bidirectional (masked modelling).
            rows: only these rows' final states are wanted (:class:`~mmm.core.output_rows.OutputRows`,
                e.g. every sequence's [CLS]): the last block then computes them alone (MosaicBERT);
                the result equals the full forward's rows.
        """
        self._check_input(x, seq)
        layout, stream_modality = seq, modality
        x, seq, order, run = self._batch_setup(x, seq, modality, causal)
        for block in self.blocks if rows is None else self.blocks[:-1]:  # with rows, the last block runs below
            x = block(x, seq, *run)
        if order is not None:
            x = x.index_select(0, order.scatter)  # (N, d) in the batch's order
        if rows is not None:
            x = self._last_block_rows(x, layout, stream_modality, rows, run[2] if order is None else None, causal)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x  # (N, d) or (M, d)

    def _last_block_rows(self, x: torch.Tensor, seq: PackedSeqInfo, modality: Union[None, int, torch.Tensor],
                         rows: OutputRows, rope: Optional[RopeTables], causal: bool) -> torch.Tensor:
        """The last block at ``rows`` of the (N, d) batch-order stream (``rope``: its tables, or None to build them)."""
        if not self.blocks:
            return x.index_select(0, rows.index)
        if rope is None and self.rotary is not None:
            rope = self.rotary.tables(seq.position_ids)
        modality = _pick(modality, rows.index, keeps_counts=False)
        backend = self.backend_for(x.device)  # unused by the rows path; the call goes through the block's wrappers
        route = self.route(modality, rows.index.shape[0], check_values=False)  # rows of the stream checked before
        return self.blocks[-1](x, seq, backend, self.alibi, rope, route, causal, rows=rows)

    def _batch_setup(self, x: torch.Tensor, seq: PackedSeqInfo, modality: Union[None, int, torch.Tensor],
                     causal: bool) -> Tuple[torch.Tensor, PackedSeqInfo, Optional[LongestFirst], tuple]:
        """What every block reads, computed once per batch: ``(x, seq, order, (backend, bias, rope, route, causal))``.

        On the sdpa backend a batch not in longest-first order (fine-tuning, embedding) is reordered
        here once (``order``; :class:`~mmm.core.packing.LongestFirst`), so that its length groups hold
        similar lengths; the caller scatters the outputs back with ``order.scatter``.
        """
        backend = self.backend_for(x.device)
        order = seq.longest_first if backend == "sdpa" else None
        if order is not None:
            x, seq = x.index_select(0, order.gather), order.layout  # (N, d) longest first
            modality = _pick(modality, order.gather, keeps_counts=True)
        rope = self.rotary.tables(seq.position_ids) if self.rotary is not None else None  # once per batch
        bias = flex_context(seq, self.alibi, causal) if backend == "flex" else self.alibi  # block mask once per batch
        return x, seq, order, (backend, bias, rope, self.route(modality, x.shape[0]), causal)

    def block_outputs(self, x: torch.Tensor, seq: PackedSeqInfo, modality: Union[None, int, torch.Tensor] = None,
                      causal: bool = False) -> List[torch.Tensor]:
        """Every block's (N, d) output, first to last, without the final norm (the layers a
        data2vec teacher averages its targets over); ``modality`` and ``causal`` as in :meth:`forward`."""
        self._check_input(x, seq)
        x, seq, order, run = self._batch_setup(x, seq, modality, causal)
        outputs = []
        for block in self.blocks:
            x = block(x, seq, *run)
            outputs.append(x if order is None else x.index_select(0, order.scatter))
        return outputs


def fold_modality_experts(state: Dict[str, torch.Tensor], expert: int, prefix: str = "encoder.") -> Dict[str, torch.Tensor]:
    """A state dict with modality experts turned into one of a plain encoder: expert ``expert``'s MLP
    becomes each block's ``mlp`` (exact for that modality's tokens); the other experts are dropped.
    A state without experts is returned unchanged.

    Args:
        state: weights (e.g. a checkpoint's ``encoder.*``).
        expert: the modality's index (its place in the model's modality order).
        prefix: the encoder's key prefix in ``state``.
    """
    out: Dict[str, torch.Tensor] = {}
    marker = ".mlp.experts."
    for key, value in state.items():
        if not key.startswith(prefix) or marker not in key:
            out[key] = value
            continue
        head, tail = key.split(marker, 1)
        index, rest = tail.split(".", 1)
        if int(index) == expert:
            out[f"{head}.mlp.{rest}"] = value
    return out
