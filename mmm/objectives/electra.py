"""Replaced-token detection (ELECTRA, Clark et al. 2020) with gradient-disentangled embedding
sharing (DeBERTaV3, He et al. 2021).

A small generator -- an MLM with its own narrow encoder -- reads the masked batch and predicts the
masked tokens. Inside the training step (the data workers never see the model) its predictions
are *sampled* and written into the masked positions; the shared encoder, the discriminator,
reads that corrupted sequence and a binary head says for every token whether it is the original
or a replacement. A sample that happens to equal the original token counts as original. The loss
is ``generator MLM + rtd_weight * RTD`` (ELECTRA: 50). No gradient passes through the sampling.

The token table of the two networks is shared in one of three ways (``embedding_sharing``):

* ``shared`` (ELECTRA): one token table, one position table and one embedding LayerNorm (the
  paper shares the token and positional embeddings, Sec. 3.2; its code shares the whole embedding
  layer); the generator's MLM loss and the discriminator's RTD loss both train them.
* ``gdes`` (DeBERTaV3): the discriminator's table is ``stop_gradient(generator table) +
  residual``, the residual starting at zero; the RTD loss trains only the residual, the MLM loss
  only the generator table, so the two losses stop pulling the table in different directions.
* ``none``: two independent tables.

Only the discriminator is an encoder: :func:`~mmm.encoders.load_encoder` and the HF export read
``embedders.<modality>.*`` and ``encoder.*``; the generator lives under this objective and is
dropped with the other heads. Under ``gdes`` the discriminator table's state-dict entry holds
the effective table (generator table + residual), so a checkpoint exports like any other.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import PackedBatch
from mmm.config import EncoderConfig
from mmm.core.encoder import TransformerEncoder
from mmm.objectives.base import (ObjectiveOutput, global_mean, in_lockstep, sole_input, token_table, top1_accuracy,
                                 zero_output)
from mmm.registry import EMBEDDERS, OBJECTIVES

EMBEDDING_SHARING = ("shared", "gdes", "none")


@dataclass
class ReplacedTokens:
    """What the generator did to a batch: the discriminator's targets and the generator's loss.

    Args:
        replaced: (N_m,) bool per token of the modality, True where the corrupted id differs from the original.
        generator_loss: scalar generator MLM loss (normalised like every head's loss, see ``global_mean``).
        generator_acc: scalar, detached: fraction of masked tokens the generator's argmax gets right.
        generator_count: number of masked tokens the generator predicted.
    """

    replaced: torch.Tensor
    generator_loss: torch.Tensor
    generator_acc: torch.Tensor
    generator_count: int


class GDESEmbedding(nn.Module):
    """The discriminator's token table under gradient-disentangled sharing: ``sg(E_G) + residual``.

    It owns no parameter: the generator's table belongs to the generator and the residual to the
    objective (so each is saved once, under its owner); both are read from the owner at every use,
    so moving or wrapping the model cannot leave a stale copy here. Its state-dict entry ``weight``
    is the effective table, which is what an exported encoder needs; loading one sets the residual
    to ``weight - E_G`` (so a warm start from a plain checkpoint keeps that table exactly as the
    discriminator's), and the residual's own entry, loaded after it, wins on resume.

    Args:
        owner: the :class:`ReplacedTokenDetection` objective holding ``generator_embedder.tokens``
            and ``embedding_residual``.
    """

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self._owner = (owner,)  # a tuple: not registered as a child (the owner is saved under its own name)

    def _parts(self):
        owner = self._owner[0]
        return owner.generator_embedder.tokens, owner.embedding_residual

    @property
    def num_embeddings(self) -> int:
        return int(self._parts()[1].shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self._parts()[1].shape[1])

    @property
    def padding_idx(self) -> Optional[int]:
        return None

    @property
    def weight(self) -> torch.Tensor:
        """(V, d) effective table; gradients reach only the residual."""
        source, residual = self._parts()
        return source.weight.detach() + residual

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) ids → (N, d)."""
        return F.embedding(ids, self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        value = state_dict[key]
        source, residual = self._parts()
        if tuple(value.shape) != tuple(residual.shape):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                              f"shape in current model is {tuple(residual.shape)}.")
            return
        with torch.no_grad():
            residual.copy_(value.to(residual) - source.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gdes"


class GeneratorHead(nn.Module):
    """The generator's MLM head: dense (generator width → table width) → GELU → LayerNorm → tied table.

    Args:
        dim: generator width.
        table: the generator's token table (its weight is the output projection).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, table: nn.Embedding, norm_eps: float) -> None:
        super().__init__()
        width = table.embedding_dim
        self.dense = nn.Linear(dim, width)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.table = table
        self.bias = nn.Parameter(torch.zeros(table.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, d_G) → (M, V) logits."""
        return F.linear(self.norm(F.gelu(self.dense(hidden))), self.table.weight, self.bias)


def generator_encoder_config(cfg: EncoderConfig, size: float, depth: Optional[int]) -> EncoderConfig:
    """The generator's encoder: ``size`` times the discriminator's width, heads and MLP (ELECTRA's recipe).

    The head count scales with the width (at least one head), and the width is rounded to a multiple of it.

    Args:
        cfg: the discriminator's (the shared encoder's) config.
        size: width fraction, in (0, 1].
        depth: number of blocks; None = as many as the discriminator.
    """
    heads = max(1, round(cfg.heads * size))
    dim = max(1, round(cfg.dim * size / heads)) * heads
    mlp = None if cfg.mlp_hidden is None else max(1, round(cfg.mlp_hidden * dim / cfg.dim))
    return dataclasses.replace(cfg, dim=dim, heads=heads, mlp_hidden=mlp, depth=depth or cfg.depth)


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(M, V) logits → (M,) ids drawn from ``softmax(logits / temperature)`` (no gradient).

    Inverse-CDF sampling: one uniform number per row, looked up in the row's cumulative
    probabilities. ``torch.multinomial`` (which draws exponentials, Gumbel-max in disguise) and
    Gumbel-max draw one random number per *vocabulary entry*, M x V of them: on DNA's 4,101
    6-mers that was 47 % of an ELECTRA step on CPU, Gumbel-max 34 %, this 14 % (README,
    "Recipes at equal compute"). Same distribution up to float32 rounding of the cumulative sum
    (about 1e-7 per token); a token of probability 0 (logit -inf) is never drawn. Uses torch's
    global RNG, seeded like the step.

    Args:
        logits: (M, V) generator logits at the masked positions.
        temperature: softmax temperature (> 0).
    """
    with torch.no_grad():
        cdf = torch.softmax(logits.detach().float() / temperature, dim=-1).cumsum_(-1)  # (M, V), nondecreasing
        total = cdf[:, -1:]  # (M, 1), 1 up to rounding
        u = torch.rand_like(total) * total  # (M, 1) in [0, total)
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding never reaches total
        # the first entry whose cumulative probability exceeds u: token i for u in [cdf[i-1], cdf[i])
        return torch.searchsorted(cdf, u, right=True).squeeze(1)  # (M,)


@OBJECTIVES.register("electra")
class ReplacedTokenDetection(nn.Module):
    """ELECTRA: generator MLM + ``rtd_weight`` x replaced-token detection by the shared encoder.

    :meth:`prepare` runs before the shared encoder (the model calls it): the generator predicts the
    masked tokens, its samples replace them, and the batch continues with the corrupted ids and the
    :class:`ReplacedTokens` targets. :meth:`forward` then classifies every token of the modality.

    Args:
        dim: encoder width (given by the model builder).
        embedders: the model's embedders (given by the builder); under ``shared`` / ``gdes`` the
            modality's token table is shared with the generator (``gdes`` swaps in a
            :class:`GDESEmbedding`).
        encoder_cfg: the shared encoder's config (given by the builder).
        modality: the token modality (``text`` or ``dna``) the objective corrupts (config).
        generator_size: generator width as a fraction of the discriminator's (ELECTRA: 1/4 to 1/2) (config).
        generator_depth: generator blocks; None = the discriminator's depth (config).
        rtd_weight: weight of the detection loss, lambda (ELECTRA: 50) (config).
        embedding_sharing: ``shared`` (ELECTRA), ``gdes`` (DeBERTaV3) or ``none`` (config).
        temperature: sampling temperature of the generator's softmax (config).
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 modality: str = "text", generator_size: float = 0.25, generator_depth: Optional[int] = None,
                 rtd_weight: float = 50.0, embedding_sharing: str = "shared", temperature: float = 1.0) -> None:
        super().__init__()
        token_table(embedders, modality, "electra", "replaced-token detection")
        disc = embedders[modality]
        if embedding_sharing not in EMBEDDING_SHARING:
            raise ValueError(f"objective electra: embedding_sharing must be one of {EMBEDDING_SHARING}, "
                             f"got {embedding_sharing!r}")
        if isinstance(generator_size, bool) or not isinstance(generator_size, (int, float)) or not 0 < generator_size <= 1:
            raise ValueError(f"objective electra: generator_size must be a number in (0, 1], got {generator_size!r}")
        if generator_depth is not None and generator_depth < 1:
            raise ValueError(f"objective electra: generator_depth must be >= 1 or null, got {generator_depth}")
        if rtd_weight < 0 or temperature <= 0:
            raise ValueError(f"objective electra: rtd_weight must be >= 0 and temperature > 0, got "
                             f"{rtd_weight} and {temperature}")
        self.modality = modality
        self.target_key = f"{modality}_replaced"
        self.rtd_weight = float(rtd_weight)
        self.temperature = float(temperature)
        self.embedding_sharing = embedding_sharing

        gen_cfg = generator_encoder_config(encoder_cfg, generator_size, generator_depth)
        vocab = disc.tokens.num_embeddings
        # shared tables have the discriminator's width; the generator projects them to its own
        table_dim = gen_cfg.dim if embedding_sharing == "none" else dim
        self.generator_embedder = EMBEDDERS.create(
            "text", vocab_size=vocab, dim=table_dim, max_len=disc.max_len, position=disc.positions.kind,
            embed_norm=disc.norm is not None, norm_eps=encoder_cfg.norm_eps, dropout=encoder_cfg.dropout,
            pad_id=disc.pad_id, segments=disc.segments.num_embeddings if disc.segments is not None else 0,
            sep_id=disc.sep_id)
        if embedding_sharing == "shared":  # ELECTRA Sec. 3.2: token, position and token type embeddings (its code:
            self.generator_embedder.tokens = disc.tokens  # the LayerNorm too)
            self.generator_embedder.positions = disc.positions
            self.generator_embedder.segments = disc.segments
            self.generator_embedder.norm = disc.norm
        # with segment embeddings a sampled [SEP] would move the rest of its sequence into the next segment (the
        # discriminator would read the replacement off the segment shift): the generator never proposes it
        self.unsampled_id = disc.sep_id if disc.segments is not None else None
        self.embedding_residual = None
        if embedding_sharing == "gdes":
            self.embedding_residual = nn.Parameter(torch.zeros(vocab, dim))
            disc.tokens = GDESEmbedding(self)
        self.generator_proj = nn.Linear(table_dim, gen_cfg.dim) if table_dim != gen_cfg.dim else nn.Identity()
        self.generator = TransformerEncoder(gen_cfg)
        self.generator_head = GeneratorHead(gen_cfg.dim, self.generator_embedder.tokens, encoder_cfg.norm_eps)
        # ELECTRA's discriminator head: dense → GELU → one logit per token
        self.discriminator_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    @property
    def generator_dim(self) -> int:
        return self.generator.cfg.dim

    def prepare(self, batch: PackedBatch) -> PackedBatch:
        """Run the generator on the masked batch and return it corrupted by the generator's samples.

        Called by :class:`~mmm.model.MaskedModel` before the shared encoder. The returned batch has
        the sampled ids at the masked positions of ``inputs[modality]`` and a :class:`ReplacedTokens`
        under ``targets[f"{modality}_replaced"]``; a batch without this modality is returned as is.
        """
        inp = sole_input(batch, self.modality, "electra", "the generator encodes them as the batch's sequences")
        if inp is None:
            return batch
        ids = inp.ids  # (N,)
        t = batch.targets.get(self.modality)
        sync = in_lockstep(self)
        x = self.generator_proj(self.generator_embedder(ids, inp.position_ids))  # (N, d_G)
        gen_hidden = self.generator(x, batch.seq)  # (N, d_G)
        if t is None or t.positions.numel() == 0:
            zero = gen_hidden.sum() * 0.0 + sum(p.sum() for p in self.generator_head.parameters()) * 0.0
            gen = ReplacedTokens(torch.zeros_like(ids, dtype=torch.bool), global_mean(zero, 0, sync),
                                 zero.detach(), 0)
            return dataclasses.replace(batch, targets={**batch.targets, self.target_key: gen})
        logits = self.generator_head(gen_hidden.index_select(0, t.positions))  # (M, V)
        gen_loss = global_mean(F.cross_entropy(logits.float(), t.labels, reduction="sum"), t.labels.numel(), sync)
        gen_acc = top1_accuracy(logits, t.labels, share_ties=not self.training)
        proposals = logits if self.unsampled_id is None else logits.detach().index_fill(1, torch.tensor(
            [self.unsampled_id], device=logits.device), float("-inf"))
        sampled = sample_tokens(proposals, self.temperature)  # (M,) drawn here, in the step
        original = ids.index_copy(0, t.positions, t.labels)  # (N,) the uncorrupted sequence
        corrupted = ids.index_copy(0, t.positions, sampled)  # (N,)
        replaced = corrupted != original  # a sample equal to the original token is not a replacement
        gen = ReplacedTokens(replaced, gen_loss, gen_acc, int(t.labels.numel()))
        return dataclasses.replace(batch, inputs={**batch.inputs, self.modality: dataclasses.replace(inp, ids=corrupted)},
                                   targets={**batch.targets, self.target_key: gen})

    def rtd_loss(self, hidden: torch.Tensor, replaced: torch.Tensor) -> tuple:
        """Replaced-token detection over every token: (normalised BCE loss, detached accuracy).

        Args:
            hidden: (N, d) discriminator output.
            replaced: (N,) bool targets.
        """
        logits = self.discriminator_head(hidden).squeeze(-1).float()  # (N,)
        target = replaced.to(logits.dtype)
        loss = global_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="sum"), replaced.numel(),
                           in_lockstep(self))
        acc = ((logits > 0) == replaced).float().mean()
        return loss, acc.detach()

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) shared-encoder output of the corrupted batch → generator MLM + rtd_weight x RTD."""
        names = ("generator_loss", "rtd_loss", "generator_acc", "rtd_acc", "replaced")
        if self.modality not in batch.inputs:
            return zero_output(hidden, self, names)
        gen = batch.targets.get(self.target_key)
        if gen is None:
            raise ValueError(f"objective electra: the batch has no {self.target_key!r} targets; the generator runs "
                             f"in prepare(batch), which MaskedModel.forward calls before the encoder")
        rtd, rtd_acc = self.rtd_loss(hidden, gen.replaced)
        loss = gen.generator_loss + self.rtd_weight * rtd
        metrics = {"generator_loss": gen.generator_loss.detach(), "rtd_loss": rtd.detach(),
                   "generator_acc": gen.generator_acc, "rtd_acc": rtd_acc,
                   "replaced": gen.replaced.float().mean().detach()}
        return ObjectiveOutput(loss, metrics, int(gen.replaced.numel()))
