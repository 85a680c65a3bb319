"""Tiny labelled tasks and encoders for the downstream tests (built in tmp folders, seconds on CPU)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

WORDS_A = ["returns", "list", "values", "string", "result", "object"]
WORDS_B = ["raises", "error", "exception", "invalid", "fails", "warning"]
FILLER = ["the", "a", "of", "this", "function", "module", "and", "is", "to", "for"]


def keyword_rows(n: int, seed: int) -> List[Tuple[str, str]]:
    """``(sentence, label)``: label ``pos`` sentences use only WORDS_A keywords, ``neg`` only WORDS_B."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = list(rng.choice(FILLER, 5)) + list(rng.choice(WORDS_A if label == "pos" else WORDS_B, 3))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_table(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A .tsv / .csv / .jsonl file with ``header`` columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows), encoding="utf-8")
        return path
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writerow(header)
        w.writerows(rows)
    return path


def shape_images(root: Path, per_class: int = 12) -> Path:
    """ImageFolder tree ``root/{square,disk}/*.png``: bright squares vs bright disks on black, 16x16."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for cls in ("disk", "square"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", (16, 16))
            d = ImageDraw.Draw(img)
            x, y = (int(v) for v in rng.integers(1, 6, 2))
            box = [x, y, x + 9, y + 9]
            (d.ellipse if cls == "disk" else d.rectangle)(box, fill=(255, 255, 255))
            img.save(root / cls / f"{i}.png")
    return root


def check_cls_last_block(model, last_mlp, items) -> List[int]:
    """One fine-tuning step of ``model`` (a ``FinetuneModel`` on [CLS]) with and without its final-layer subset
    (``cls_last_block``): asserts the same logits and every gradient, and returns the rows ``last_mlp`` (the
    last block's MLP) saw in each, subset first."""
    import torch

    rows_seen: List[int] = []
    hook = last_mlp.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[0]))
    results = []
    try:
        for subset in (True, False):
            model.cls_last_block = subset
            model.zero_grad(set_to_none=True)
            logits = model(items)
            logits.square().sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((logits.detach(), grads))
    finally:
        hook.remove()
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-4, msg=name)
    return rows_seen


PARITY_CONFIG = dict(lr=1e-3, weight_decay=0.01, batch_size=8, epochs=1, warmup=0.2, dropout=0.0, seeds=1)
"""The fine-tuning settings of the parity tests (dropout off, so both sides compute the same function)."""


def finetune_parity_start(ckpt: Path, train, tmp_path: Path):
    """``(items, labels, cfg, mmm's first training losses, hf, hf_dir)`` for a fine-tuning parity test: mmm fine-tunes
    the checkpoint's text encoder on ``train`` (seed 0); ``hf`` is ``BertForSequenceClassification`` on the exported
    encoder, dropout off, with mmm's initial head (rebuilt from the same seed) in its pooler and classifier."""
    import torch
    import transformers

    from mmm.downstream.data import Labels, encode_labels
    from mmm.downstream.finetune import ClassificationHead, FinetuneConfig, train_one_seed
    from mmm.downstream.inputs import load_adapter
    from mmm.interop.hf import export_hf_bert

    y = encode_labels(train, Labels.fit(train, "classification"))
    adapter = load_adapter(str(ckpt), "text")
    items = [adapter.prepare(x) for x in train.inputs]
    cfg = FinetuneConfig(**PARITY_CONFIG)
    make = lambda: load_adapter(str(ckpt), "text")  # noqa: E731
    mmm_losses = train_one_seed(make, (items, y), (items[:8], y[:8]), None, 2, cfg, seed=0, log=lambda s: None).first_losses
    torch.manual_seed(0)  # the same initial head, rebuilt from the same seed
    make()
    head = ClassificationHead(adapter.hidden_size, 2, 0.0)
    hf_dir = export_hf_bert(adapter.encoder, tmp_path / "hf")
    hf = transformers.BertForSequenceClassification.from_pretrained(
        hf_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    with torch.no_grad():
        hf.bert.pooler.dense.load_state_dict(head.dense.state_dict())
        hf.classifier.load_state_dict(head.classifier.state_dict())
    return items, y, cfg, mmm_losses, hf, hf_dir


def hf_first_losses(hf, batches, cfg, steps_total: int, tmp_path: Path) -> List[float]:
    """HF's training losses over ``batches`` (dicts of model inputs with ``labels``) with mmm's fine-tuning recipe:
    AdamW over mmm's parameter groups, HF Trainer's warmup count, linear decay, clipping (the HF side of the
    fine-tuning parity tests)."""
    import torch
    import transformers

    from mmm.downstream.finetune import fused_adamw_ok, linear_warmup_decay, param_groups

    hf.train()
    opt = torch.optim.AdamW(param_groups(hf, cfg.weight_decay), lr=cfg.lr, fused=fused_adamw_ok(hf))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "args"), warmup_steps=cfg.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps_total, args.get_warmup_steps(steps_total)))
    losses = []
    for inputs in batches:
        out = hf(**inputs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    return losses
