"""The text part of ``mmm demo``: pretrain the tiny text MLM on the embedded corpus, report what it learned.

Steps: build the embedded corpus (stdlib docstrings) → train a tokenizer → pretrain
``configs/text_mlm_tiny.yaml`` for a few minutes on CPU → score held-out masked-token accuracy and
perplexity of the trained model and of the same network at its initialisation, on identical
masks → the report section, ``loss_curve.png`` and the metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from mmm.batch import pack_masked
from mmm.config import PretrainConfig
from mmm.masking.base import MaskedTokens
from mmm.evaluate import MLMScore, evaluate_mlm, evaluate_unigram, unigram_log_probs
from mmm.model import MaskedModel
from mmm.modalities.text.tokenizer import TextTokenizer
from mmm.demo.common import bold_better, demo_part, plot_losses, report_end, table_row, train_part

logger = logging.getLogger("mmm.demo")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "text_mlm_tiny.yaml"


@torch.no_grad()
def fill_in_examples(models: Dict[str, MaskedModel], tokenizer: TextTokenizer, texts: List[str], n: int = 6,
                     seed: int = 0) -> List[Dict[str, str]]:
    """Hide one whole word in short held-out snippets and show each model's three top guesses."""
    rng = np.random.default_rng(seed)
    rows = []
    for text in texts:
        ids, word_ids = tokenizer.encode(" ".join(text.split()[:40]))
        ids, word_ids = ids[:60], word_ids[:60]
        words = [w for w in np.unique(word_ids) if (word_ids == w).sum() == 1]
        words = [w for w in words if len(tokenizer.decode([int(ids[word_ids == w][0])])) >= 4]
        if not words:
            continue
        w = int(rng.choice(words))
        pos = int(np.flatnonzero(word_ids == w)[0])
        seq_ids = np.concatenate([[tokenizer.cls_id], ids, [tokenizer.sep_id]]).astype(np.int64)
        answer = int(seq_ids[pos + 1])
        seq_ids[pos + 1] = tokenizer.mask_id
        batch = pack_masked([MaskedTokens(seq_ids, np.array([pos + 1]), np.array([answer]))])
        row = {"text": tokenizer.decode(seq_ids.tolist(), skip_special_tokens=False)
               .replace("[CLS]", "").replace("[SEP]", "").strip(), "answer": tokenizer.decode([answer])}
        for name, model in models.items():
            model.eval()
            hidden = model.encode(batch)
            logits = model.objectives["mlm"].head(hidden[batch.targets["text"].positions])
            row[name] = " · ".join(tokenizer.decode([int(i)]) for i in logits[0].topk(3).indices)
        rows.append(row)
        if len(rows) >= n:
            break
    return rows


def _train_and_evaluate(cfg: PretrainConfig, out_dir: Path, quick: bool) -> Dict[str, object]:
    from datasets_def.text import iter_texts

    part = train_part(cfg)
    tok, masker = part.run.tokenizer, part.run.masker
    scores: Dict[str, MLMScore] = {
        name: evaluate_mlm(m, tok, masker, part.val_urls, max_len=cfg.model.text.max_len, batch_size=cfg.data.batch_size)
        for name, m in part.models.items()
    }
    scores["unigram"] = evaluate_unigram(unigram_log_probs(tok, iter_texts(part.train_urls)), tok, masker,
                                         part.val_urls, max_len=cfg.model.text.max_len, batch_size=cfg.data.batch_size)

    examples = fill_in_examples(part.models, tok, list(iter_texts(part.val_urls, split="val"))[:40])
    plot_losses(part.series, out_dir / "loss_curve.png", "mmm demo: tiny text MLM on Python stdlib docstrings",
                "cross-entropy (nats)", [(scores["untrained"].loss, "untrained model, held-out", "--"),
                                         (scores["unigram"].loss, "unigram frequency baseline, held-out", ":")],
                loss="MLM loss")
    tokens_per_sec = [v for _, v in part.series.get("train/tokens_per_sec", [])]
    return {
        **part.summary(cfg),
        "median_tokens_per_sec": float(np.median(tokens_per_sec)) if tokens_per_sec else None,
        "held_out": {k: vars(v) for k, v in scores.items()},
        "examples": examples,
    }


def _report(m: Dict, cfg: PretrainConfig, folder: str) -> str:
    tr, un, uni = m["held_out"]["trained"], m["held_out"]["untrained"], m["held_out"]["unigram"]
    e = cfg.model.encoder
    rows = bold_better({name: [r["accuracy"], r["perplexity"], r["loss"]]
                        for name, r in (("untrained (same init)", un), ("trained", tr))},
                       higher_is_better=[True, False, False], fmt=["{:.3f}", "{:.1f}", "{:.3f}"])
    lines = [
        "## Text: masked language modeling (BERT)",
        "",
        f"Tiny text MLM ({e.depth} layers, width {e.dim}, {e.heads} heads, vocab {cfg.model.text.vocab_size}) "
        f"pretrained for {m['steps']} steps ({m['train_seconds']} s on this machine) on the embedded corpus "
        "(Python standard-library docstrings), masking with "
        f"`{cfg.masking.name}` {cfg.masking.args}.",
        "",
        f"Held-out split: {tr['sequences']} sequences, {tr['predictions']} masked tokens, identical masks for every row. "
        "The unigram row always guesses the training split's most frequent token and scores each answer by its "
        "frequency: a model that ignores context cannot beat it.",
        "",
        "| model | masked-token accuracy | perplexity | loss (nats) |",
        "|---|---|---|---|",
        table_row(rows["untrained (same init)"]),
        f"| unigram frequency baseline | {uni['accuracy']:.3f} | {uni['perplexity']:.1f} | {uni['loss']:.3f} |",
        table_row(rows["trained"]),
        "",
        f"Median training throughput: {m['median_tokens_per_sec']:.0f} real tokens/s." if m["median_tokens_per_sec"] else "",
        "",
        f"![loss curve]({folder}/loss_curve.png)",
        "",
        "### Fill in the blank (held-out snippets, one single-token word hidden; top-3 guesses)",
        "",
        "| snippet | answer | trained | untrained |",
        "|---|---|---|---|",
    ]
    for ex in m["examples"]:
        snippet = ex["text"].replace("|", "\\|")
        lines.append(f"| {snippet} | {ex['answer']} | {ex['trained']} | {ex['untrained']} |")
    lines += report_end(folder, [], m["checkpoint"], "load the text encoder with `mmm.load_encoder(path)`")
    return "\n".join(lines)


run_text_demo = demo_part("text", DEFAULT_CONFIG, _train_and_evaluate, _report)
