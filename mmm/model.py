"""Composition: per-modality embedders + shared encoder + objective heads, assembled from a config.

:class:`MaskedModel` receives built parts (injection, as torchmultimodal composes FLAVA);
:func:`build_model` is the one place that turns a :class:`~mmm.config.ModelConfig` and the
objective list into those parts via the registries.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mmm.batch import PackedBatch
from mmm.config import ModelConfig, ObjectiveConfig
from mmm.core.encoder import TokenModality, TransformerEncoder
from mmm.core.output_rows import OutputRows
from mmm.host_reads import on_host
from mmm.masking.mto import encode_with_mto, mask_token_rows
from mmm.objectives.base import ObjectiveOutput
from mmm.registry import EMBEDDERS, OBJECTIVES, STEPS, check_kwargs


class MaskedModel(nn.Module):
    """Embedders → shared encoder → heads; returns the weighted loss and each objective's output.

    Every modality has its own embedder; all of them feed the one shared encoder. When the model
    has more than one modality, a learned modality embedding is added to each token (UNITER /
    ONE-PEACE style type embeddings) so the encoder can tell the streams apart.

    Args:
        embedders: modality name → module turning that modality's input into (N_m, d) tokens
            (called through the input's ``embed`` method).
        encoder: the shared :class:`TransformerEncoder`.
        objectives: head name → module with ``forward(hidden, batch) -> ObjectiveOutput``; a head that
            also has ``prepare(batch) -> batch`` rewrites the batch before the encoder reads it
            (ELECTRA's generator corrupts it there, inside the step); one with ``before_scoring(model, batch)``
            is called before each pass it scores (data2vec fills its teacher from the model at the first);
            one with ``after_optimizer_step(model)`` after every optimizer step (data2vec's EMA teacher);
            one with ``causal = True`` (next-token prediction) reads a causal encoder pass of its own.
            Heads never receive the model in ``forward``.
        weights: head name → loss weight.
        tasks: task name → the heads that task trains (multi-task runs); None = every head scores every batch.
        fusion: cross-modality layers for two-stream image-text batches (LXMERT), or None.
        steps: head name → step strategy (:mod:`mmm.steps`) that turns the shared pass into that head's
            ``(hidden, batch)`` on the batches it ``applies`` to (ITM on mined hard negatives, as ALBEF).
    """

    def __init__(self, embedders: Dict[str, nn.Module], encoder: TransformerEncoder, objectives: Dict[str, nn.Module],
                 weights: Dict[str, float], tasks: Optional[Dict[str, List[str]]] = None,
                 fusion: Optional[nn.Module] = None, steps: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if not embedders:
            raise ValueError("MaskedModel needs at least one embedder")
        self.embedders = nn.ModuleDict(embedders)
        self.encoder = encoder
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)
        self.tasks = {k: list(v) for k, v in (tasks or {}).items()}
        self.modality_ids = {name: i for i, name in enumerate(embedders)}
        self.modality_embed = nn.Embedding(len(embedders), encoder.cfg.dim) if len(embedders) > 1 else None
        self.fusion = fusion
        self.steps = dict(steps or {})  # parameter-free: not submodules, nothing in the state dict
        unknown = sorted(set(self.steps) - set(self.objectives))
        if unknown:
            raise ValueError(f"MaskedModel: step strategies for {unknown}, which are not heads ({list(self.objectives)})")

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """(N, d) input tokens of the packed stream, every modality in its place."""
        parts = []
        for name, inp in batch.inputs.items():
            if name not in self.embedders:
                raise ValueError(f"batch has a {name!r} input but the model has embedders for {list(self.embedders)}")
            x = inp.embed(self.embedders[name])  # (N_m, d)
            if self.modality_embed is not None:
                x = x + self.modality_embed.weight[self.modality_ids[name]]
            parts.append((inp.index, x))
        if len(parts) == 1 and parts[0][0] is None:
            return parts[0][1]
        if any(index is None for index, _ in parts):
            raise ValueError("a batch with several modality inputs must give each one its stream index")
        covered = sum(index.shape[0] for index, _ in parts)
        if covered != batch.num_tokens:  # a stream row no input fills would enter the encoder as zeros
            raise ValueError(f"the inputs' stream indices place {covered} tokens "
                             f"({', '.join(f'{n}: {i.shape[0]}' for n, i in zip(batch.inputs, (p[0] for p in parts)))}) "
                             f"but the batch's layout holds {batch.num_tokens}; every stream row needs one input token")
        x = parts[0][1].new_zeros(batch.num_tokens, parts[0][1].shape[-1])
        for index, part in parts:
            x = x.index_copy(0, index, part)
        return x

    def token_modalities(self, batch: PackedBatch) -> Union[int, TokenModality]:
        """Each token's modality index (the embedders' order): an int when one modality fills the
        stream, else a :class:`~mmm.core.encoder.TokenModality` — (N,) int64 and each index's token
        count from the inputs' sizes (what the encoder's modality experts route by, with no device read)."""
        names = list(batch.inputs)
        if len(names) == 1 and batch.inputs[names[0]].index is None:
            return self.modality_ids[names[0]]
        ids = torch.full((batch.num_tokens,), -1, dtype=torch.long, device=batch.seq.cu_seqlens.device)
        for name in names:
            index = batch.inputs[name].index
            if index is None:
                raise ValueError("a batch with several modality inputs must give each one its stream index")
            ids = ids.index_fill(0, index, self.modality_ids[name])
        counts = [0] * max(self.encoder.experts, max(self.modality_ids.values()) + 1)
        for name in names:
            counts[self.modality_ids[name]] += batch.inputs[name].index.shape[0]
        return TokenModality(ids, tuple(counts))

    def output_rows(self, batch: PackedBatch, heads: Optional[Sequence[str]] = None) -> Optional[OutputRows]:
        """The rows of ``batch`` whose final hidden states ``heads`` (default: :meth:`heads_for`) read, for
        the final-layer subset (``encoder.final_layer_subset``, MosaicBERT); None when it is off, when a
        head does not name its rows (:meth:`reads_rows`; e.g. ELECTRA, ITM, MLM's enhanced decoder), for
        MTO and two-stream batches, or when the rows are not on the host (reading them back from a
        device would stall it: the training module finds them before the batch moves).
        """
        if not self.encoder.cfg.final_layer_subset or self.encoder.cfg.mto_layers or batch.partners is not None:
            return None
        parts = []
        for name in self.heads_for(batch) if heads is None else heads:
            if bool(getattr(self.objectives[name], "causal", False)):
                continue  # next-token heads read their own causal pass, which never takes the subset
            reads = getattr(self.objectives[name], "reads_rows", None)
            rows = reads(batch) if reads is not None else None
            if rows is None or rows.device.type != "cpu":
                return None
            parts.append(rows.reshape(-1))
        rows = torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)  # sorted
        if rows.numel() == 0:
            return None
        return OutputRows.of(batch.seq, rows)  # built from the layout's host-side lengths, on its device

    def encode(self, batch: PackedBatch, causal: bool = False, rows: Optional[OutputRows] = None) -> torch.Tensor:
        """(N, d) hidden states of a packed batch (fused across paired sequences when it has ``partners``).

        Args:
            batch: the packed batch.
            causal: each token attends only to itself and earlier tokens of its sequence (next-token heads).
            rows: run the last block for these rows alone (:meth:`output_rows`); the other rows of the
                result are zero, so only heads that read no other row may take it.
        """
        if rows is not None:
            if causal or batch.partners is not None or self.encoder.cfg.mto_layers:
                raise ValueError("the final-layer subset is for bidirectional single-stream passes without MTO")
            modality = self.token_modalities(batch) if self.encoder.experts else None
            x = self.embed(batch)
            picked = self.encoder(x, batch.seq, modality=modality, rows=rows)  # (M, d)
            return picked.new_zeros(x.shape[0], picked.shape[1]).index_copy(0, rows.index, picked)
        kw = {"causal": True} if causal else {}
        mto = self.encoder.cfg.mto_layers
        rows = mask_token_rows(batch, self.embedders) if mto and not causal else None
        if rows is not None:  # MTO: the first blocks leave the mask-embedding tokens out of the others' keys
            modality = self.token_modalities(batch) if self.encoder.experts else None
            hidden = encode_with_mto(self.encoder, self.embed(batch), batch.seq, rows, mto, modality)
        elif self.encoder.experts:  # modality experts: every token passes its own modality's MLP
            hidden = self.encoder(self.embed(batch), batch.seq, modality=self.token_modalities(batch), **kw)
        else:
            hidden = self.encoder(self.embed(batch), batch.seq, **kw)
        if batch.partners is None:
            return hidden
        if causal:
            raise ValueError("causal encoding of a two-stream (paired) batch is not supported: the cross-modality "
                             "layers attend both ways")
        if self.fusion is None:
            raise ValueError("the batch pairs its sequences (two-stream layout) but the model has no cross-modality "
                             "layers; set model.image_text.layout: two_stream")
        return self.fusion(hidden, batch.seq, batch.partners, self.encoder.backend_for(hidden.device),
                           alibi=self.encoder.alibi, rotary=self.encoder.rotary)

    def heads_for(self, batch: PackedBatch) -> List[str]:
        """Names of the heads that score ``batch``: its task's heads in a multi-task model, every head otherwise."""
        if not self.tasks:
            return list(self.objectives)
        if batch.task not in self.tasks:
            raise ValueError(f"this model trains several tasks ({sorted(self.tasks)}) and a batch of task "
                             f"{batch.task!r} matches none of them; set batch.task to the task whose heads should "
                             f"score it")
        return self.tasks[batch.task]

    def forward(self, batch: PackedBatch, heads: Optional[Sequence[str]] = None
                ) -> Tuple[torch.Tensor, Dict[str, ObjectiveOutput]]:
        """Weighted loss and each scoring head's output.

        Heads with ``causal = True`` (next-token prediction) read their own, causal encoder pass;
        the others share one bidirectional pass, so a model with both kinds encodes a batch twice.

        Args:
            batch: the packed batch.
            heads: only these heads score it (a phased run's current phase); None = :meth:`heads_for`.
        """
        names = self.heads_for(batch)
        if heads is not None:
            names = [n for n in names if n in heads]
            if not names:
                raise ValueError(f"none of the heads {list(heads)} scores this batch (its heads: "
                                 f"{self.heads_for(batch)})")
        outputs: Dict[str, ObjectiveOutput] = {}
        for causal in (False, True):
            group = [n for n in names if bool(getattr(self.objectives[n], "causal", False)) == causal]
            if group:
                outputs.update(self._score(batch, group, causal))
        outputs = {name: outputs[name] for name in names}
        total = sum(self.weights[name] * out.loss for name, out in outputs.items())
        return total, outputs

    def check_batch(self, batch: PackedBatch, heads: Optional[Sequence[str]] = None) -> None:
        """Each scoring head's checks of ``batch`` that read its values (e.g. label ranges), made while the
        batch is on the host: the training module runs them before it copies a batch to a GPU, so the step
        never waits on the device for them (a head runs its own check in ``forward`` for a CPU batch).

        Heads opt in with a ``check_batch(batch)`` method that raises a ``ValueError`` naming the problem.
        """
        names = self.heads_for(batch) if heads is None else [n for n in self.heads_for(batch) if n in heads]
        with on_host():
            for name in names:
                check = getattr(self.objectives[name], "check_batch", None)
                if check is not None:
                    check(batch)

    def _score(self, batch: PackedBatch, heads: List[str], causal: bool) -> Dict[str, ObjectiveOutput]:
        """One encoder pass (causal or not) and the outputs of ``heads`` on it."""
        for name in heads:
            before = getattr(self.objectives[name], "before_scoring", None)
            if before is not None:  # data2vec's teacher starts as the student at the first step
                before(self, batch)
        for name in heads:  # a head that corrupts the input inside the step (ELECTRA's generator samples) does it first
            prepare = getattr(self.objectives[name], "prepare", None)
            if prepare is not None:
                batch = prepare(batch)
        rows = None
        if not causal:  # found on the host before the move (training module), else here when the batch is on the host
            rows = batch.output_rows if batch.output_rows is not None else self.output_rows(batch, heads)
        hidden = self.encode(batch, causal=causal, rows=rows)
        outputs = {}
        for name in heads:
            step = self.steps.get(name)
            if step is not None and step.applies(batch):  # e.g. mined ITM pairs, encoded again
                head_hidden, head_batch = step(self, hidden, batch)
                outputs[name] = self.objectives[name](head_hidden, head_batch)
            else:
                outputs[name] = self.objectives[name](hidden, batch)
        return outputs

    def after_optimizer_step(self) -> None:
        """Run every head's ``after_optimizer_step(model)`` hook (the trainer calls this after each
        optimizer step; a data2vec head moves its EMA teacher there)."""
        for head in self.objectives.values():
            hook = getattr(head, "after_optimizer_step", None)
            if hook is not None:
                hook(self)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: N(0, std) for linear/embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("positions.weight"):
            nn.init.normal_(p, std=std)


def build_text_embedder(cfg: ModelConfig, vocab_size: int, pad_id: int, modality: str = "text",
                        sep_id: Optional[int] = None) -> nn.Module:
    """The token embedder of a discrete-token modality (``text`` or ``dna``: the section of ``cfg``
    giving ``max_len``, ``position``, ``embed_norm`` and, for text, ``segments``) for a tokenizer of
    ``vocab_size`` ids whose ``[SEP]`` is ``sep_id`` (needed with segments)."""
    t, e = getattr(cfg, modality), cfg.encoder
    return EMBEDDERS.create("text", vocab_size=vocab_size, dim=e.dim, max_len=t.max_len, position=t.position,
                            embed_norm=t.embed_norm, norm_eps=e.norm_eps, dropout=e.dropout, pad_id=pad_id,
                            segments=getattr(t, "segments", 0), sep_id=sep_id)


def head_name(o: ObjectiveConfig) -> str:
    """The key an objective's head is stored and logged under (``label``, else the registry name)."""
    return o.label or o.name


def check_head_selection(where: str, chosen: Sequence[str], heads: Sequence[str], error: type = ValueError) -> None:
    """Refuse a list of heads (a task's or a phase's ``objectives``) that is empty, names a head the run does
    not have, or names one twice; ``where`` (e.g. ``tasks[0].objectives``) and the run's heads in the message."""
    known = sorted(heads)
    if not chosen:
        raise error(f"{where} is empty: list the heads it trains (heads: {known})")
    unknown = [h for h in chosen if h not in heads]
    if unknown:
        raise error(f"{where}: {unknown[0]!r} is not a head of this run; heads are the objectives' labels or "
                    f"names: {known}")
    if len(set(chosen)) != len(chosen):
        raise error(f"{where} lists a head twice: {list(chosen)}")


# the keywords build_model passes every objective itself, and where their values come from (args may not set them)
OBJECTIVE_SUPPLIED = {"dim": "model.encoder.dim", "embedders": "the run's modalities", "encoder_cfg": "model.encoder"}


def build_model(cfg: ModelConfig, objectives: List[ObjectiveConfig], embedders: Dict[str, nn.Module],
                tasks: Optional[Dict[str, List[str]]] = None) -> MaskedModel:
    """Assemble and initialise a :class:`MaskedModel` (freshly initialised; a new run applies
    ``model.init_from`` itself, see :func:`mmm.warm_start.warm_start`, so that rebuilding a model
    from a checkpoint's config never reads the warm-start source again).

    Args:
        cfg: network configuration.
        objectives: heads to attach (registry names, weights, args).
        embedders: modality → built embedder (see :mod:`mmm.modalities`).
        tasks: task → head names (multi-task runs); None = every batch trains every head.
    """
    if not objectives:
        raise ValueError("config.objectives is empty: at least one objective is needed")
    embedders = dict(embedders)
    encoder = TransformerEncoder(cfg.encoder, experts=len(embedders) if cfg.encoder.experts else 0)
    heads: Dict[str, nn.Module] = {}
    for o in objectives:
        key = head_name(o)
        if key in heads:
            raise ValueError(f"objective {key!r} is listed twice in config.objectives; give one of them a distinct "
                             f"'label' (e.g. label: {o.name}_{o.args.get('modality', 'x')})")
        check_kwargs(OBJECTIVES.get(o.name), dict(o.args), f"objective {key!r} (its args)", supplied=OBJECTIVE_SUPPLIED,
                     types=True)
        heads[key] = OBJECTIVES.create(o.name, dim=cfg.encoder.dim, embedders=embedders, encoder_cfg=cfg.encoder,
                                       **o.args)
    for head in heads.values():  # a head that shares a part of another head (CLM reusing the MLM head) takes it here
        bind = getattr(head, "bind_heads", None)
        if bind is not None:
            bind(heads)
    fusion = None
    if cfg.image_text.layout == "two_stream":
        from mmm.core.fusion import CrossModalFusion

        fusion = CrossModalFusion(cfg.encoder, cfg.image_text.cross_layers)
    elif cfg.image_text.layout != "single":
        raise ValueError(f"model.image_text.layout must be single or two_stream, got {cfg.image_text.layout!r}")
    steps = {}
    for key, head in heads.items():  # a head that reads a model-level step's output (ITM on mined negatives) names it
        if getattr(head, "step", None) is not None:
            name, args = head.step
            steps[key] = STEPS.create(name, head=key, heads=heads, two_stream=fusion is not None, **args)
    model = MaskedModel(embedders, encoder, heads, {head_name(o): o.weight for o in objectives}, tasks, fusion, steps)
    init_weights(model, cfg.init_std)
    for part in [*model.embedders.values(), *model.objectives.values()]:
        if hasattr(part, "reset_parameters"):  # a part's own initialiser (e.g. MAE's patch embedding) wins
            part.reset_parameters()
    return model
