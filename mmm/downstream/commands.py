"""The ``mmm embed`` and ``mmm finetune`` subcommands (parsers and handlers), added by :mod:`mmm.cli`.

    mmm embed SOURCE INPUT OUT --modality text|dna|image|audio|<plug-in> [--pooling cls|mean] [--split val]
    mmm finetune SOURCE --modality text --train train.tsv --dev dev.tsv [--test test.tsv]
                 --text_column sentence [--text_pair_column s2] --label_column label
                 [--task_type classification|regression] [--metric accuracy|f1|matthews|pearson|spearman]
                 [--seeds 3] [--epochs 3] [--lr 5e-5] [--batch_size 32] [--out DIR]
    mmm finetune SOURCE --modality image --data SHARDS      (train / val splits of labelled shards)
    mmm finetune SOURCE --task stdlib-package [--quick]     (an embedded task, built locally)
    mmm finetune SOURCE --task docstring-signature          (the embedded sentence-pair task)
    mmm --plugin MODULE finetune SOURCE --task NAME         (a plug-in modality's task)

The tasks are the registered modalities' (:func:`mmm.downstream.tasks.downstream_tasks`): ``--task`` is checked
when the command runs, after the plug-ins are imported.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:
    from mmm.downstream.tasks import DownstreamTask

MODALITY_HELP = ("text, dna, image, audio, or a plug-in modality with downstream inputs (mmm --plugin MODULE; "
                 "mmm list)")


def task_help() -> str:
    """``--task``'s help: the tasks registered when the help is shown (the built-in ones: ``mmm --help`` exits
    before the plug-ins are imported; ``mmm --plugin MODULE list task`` lists a plug-in's too)."""
    from mmm.downstream.tasks import downstream_tasks

    listed = ", ".join(f"{name} ({t.modality}, {t.data})" for name, t in downstream_tasks().items())
    return (f"a downstream task, built locally (no download): {listed}; docstring-signature is a sentence-pair "
            "task. A plug-in modality's tasks are known once it is loaded (mmm --plugin MODULE list task)")


def list_tasks_when_help_is_shown(parser: argparse.ArgumentParser, action: argparse.Action) -> None:
    """Fill ``action``'s help with :func:`task_help` when ``parser``'s help is formatted, not when the parser is
    built: listing the tasks imports every modality (about a second), which building the ``mmm`` parser must not
    cost each command."""
    format_help = parser.format_help

    def with_tasks() -> str:
        action.help = task_help().replace("%", "%%")  # argparse expands %-formats in help strings
        return format_help()

    parser.format_help = with_tasks


def find_task(name: str) -> DownstreamTask:
    """The :class:`~mmm.downstream.tasks.DownstreamTask` called ``name``; an unknown name is an error listing the
    known ones and how a plug-in's tasks are loaded."""
    from mmm.config import ConfigError
    from mmm.downstream.tasks import downstream_tasks

    tasks = downstream_tasks()
    if name not in tasks:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(tasks)} (a plug-in "
                          "modality's tasks are known once it is loaded: mmm --plugin MODULE finetune ...)")
    return tasks[name]


def _unexpected(cmd: str, rest: List[str]) -> None:
    if rest:
        from mmm.config import ConfigError

        raise ConfigError(f"unexpected arguments {rest} (see mmm {cmd} --help)")


def cmd_embed(ns: argparse.Namespace, rest: List[str]) -> int:
    _unexpected("embed", rest)
    from mmm.downstream.embed import embed
    from mmm.downstream.inputs import adapter_class

    adapter_class(ns.modality)  # an unknown modality is named before anything is read

    info = embed(ns.source, ns.input, ns.out, ns.modality, pooling=ns.pooling, batch_size=ns.batch_size,
                 split=ns.split, text_column=ns.text_column, timm_model=ns.timm_model, skip_bad=ns.skip_bad)
    cut = f" ({info['truncated']} cut to the encoder length)" if info["truncated"] else ""
    print(f"embedded {info['samples']} input(s) → {info['dim']}-d {ns.pooling}-pooled features{cut}: "
          + ", ".join(info["files"]))
    if info["labels"] and info["unlabelled"]:
        print(f"{info['unlabelled']} of {info['samples']} sample(s) carry no label: their label is -1")
    if info["skipped"]:
        where, why = info["skipped_examples"][0]
        print(f"skipped {info['skipped']} bad input(s) (--skip_bad), e.g. {where}: {why}")
    return 0


def cmd_finetune(ns: argparse.Namespace, rest: List[str]) -> int:
    _unexpected("finetune", rest)
    from mmm.config import ConfigError
    from mmm.downstream.data import load_split
    from mmm.downstream.finetune import FinetuneConfig, finetune
    from mmm.downstream.inputs import adapter_class

    modality = ns.modality or "text"
    if ns.task is not None:
        from mmm.downstream.tasks import SIZES

        if ns.data or ns.train or ns.dev or ns.test:
            raise ConfigError("--task brings its own splits; drop --data/--train/--dev/--test")
        td = find_task(ns.task)
        if ns.modality not in (None, td.modality):
            raise ConfigError(f"task {ns.task!r} is for the {td.modality} modality, not {ns.modality}")
        modality = td.modality
        train, dev, test = td.load(SIZES["quick" if ns.quick else "full"])
    elif ns.quick:
        raise ConfigError("--quick makes an embedded --task small; with your own splits, give smaller files instead")
    elif ns.data is not None and (ns.train or ns.dev):
        raise ConfigError("give either --data (a shard folder with train and val splits) or --train and --dev")
    elif ns.data is None and not (ns.train and ns.dev):
        raise ConfigError("--train and --dev are required (or --data SHARDS with train and val splits)")
    reader = adapter_class(modality)  # an unknown modality is named before anything is read
    text_col = ns.text_column or reader.default_column
    columns = [c for c in (text_col, ns.text_pair_column) if c]
    if ns.text_pair_column and not text_col:
        raise ConfigError("--text_pair_column needs --text_column")

    def split(path: Any, shard_split: Any = None) -> Any:
        return load_split(path, modality, shard_split=shard_split, columns=columns, label_column=ns.label_column,
                          skip_bad=ns.skip_bad)

    if ns.task is None and ns.data is not None:
        train, dev = split(ns.data, "train"), split(ns.data, "val")
        test = split(ns.test) if ns.test else None
    elif ns.task is None:
        train, dev = split(ns.train), split(ns.dev)
        test = split(ns.test) if ns.test else None
    pooling = ns.pooling or reader.default_pooling
    cfg = FinetuneConfig(task_type=ns.task_type, metric=ns.metric, pooling=pooling, lr=ns.lr,
                         weight_decay=ns.weight_decay, batch_size=ns.batch_size, epochs=ns.epochs,
                         max_steps=ns.max_steps, warmup=ns.warmup, eval_every=ns.eval_every, patience=ns.patience,
                         dropout=ns.dropout, seeds=ns.seeds, first_seed=ns.seed)
    res = finetune(ns.source, modality, train, dev, test, cfg=cfg, out=ns.out, timm_model=ns.timm_model,
                   device=ns.device, skip_bad=ns.skip_bad)
    skipped = sum(len(s.skipped) for s in (train, dev, test) if s is not None)  # read, or refused by the encoder
    if skipped:
        first = next(s.skipped[0] for s in (train, dev, test) if s is not None and s.skipped)
        print(f"skipped {skipped} bad row(s) (--skip_bad), e.g. {first[0]}: {first[1]}")
    print(f"{modality} fine-tuning, {len(res.seeds)} seed(s): {res.summary()}")
    if res.data.get("truncated_inputs"):
        total = sum(res.data["sizes"].values())
        print(f"{res.data['truncated_inputs']} of {total} input(s) were cut to the encoder's length (their ends were "
              f"not seen): fine-tuning keeps one piece per input")
    if ns.out:
        print(f"results: {Path(ns.out) / 'finetune.json'}; best checkpoint per seed in {ns.out}/seed*/")
    if ns.json:
        print(json.dumps(res.to_dict(), indent=2))
    return 0


def add_commands(sub: Any) -> None:
    """Add ``embed`` and ``finetune`` to the ``mmm`` subparsers ``sub``."""
    e = sub.add_parser("embed", help="pooled features of a modality's encoder for shards or raw files (.npy + keys)")
    e.add_argument("source", help="mmm checkpoint (.ckpt), save_encoder folder, HF BERT folder or timm ViT file")
    e.add_argument("input", help="shards (folder of .tar or one .tar) or a folder/file of raw inputs "
                                 "(.txt lines, FASTA, images, wav/flac; tables with --text_column)")
    e.add_argument("out", help="output folder (features.npy, keys.txt, embed.json) or a .safetensors file")
    e.add_argument("--modality", required=True, help=MODALITY_HELP)
    e.add_argument("--pooling", default="mean", choices=["cls", "mean"], help="[CLS] token or mean of tokens (default mean)")
    e.add_argument("--split", default=None, choices=["train", "val"], help="shards: only this split")
    e.add_argument("--text_column", default=None, help="table inputs: the column to embed (DNA default: sequence)")
    e.add_argument("--batch_size", type=int, default=64)
    e.add_argument("--timm_model", default=None, help="timm model name of a timm ViT weights file")
    e.add_argument("--skip_bad", action="store_true", help="skip bad inputs (an empty table cell, an undecodable "
                                                          "file or sample), counted and reported, instead of stopping")
    e.set_defaults(fn=cmd_embed)

    f = sub.add_parser("finetune", help="fine-tune an encoder with a classification/regression head over several seeds")
    f.add_argument("source", help="mmm checkpoint (.ckpt), save_encoder folder, HF BERT folder or timm ViT file")
    f.add_argument("--modality", default=None, help=MODALITY_HELP + "; default text (or the --task's)")
    task = f.add_argument("--task", default=None, metavar="NAME", help="a downstream task (listed in this help)")
    list_tasks_when_help_is_shown(f, task)
    f.add_argument("--quick", action="store_true", help="with --task: a small version of the task (smoke runs)")
    f.add_argument("--train", default=None, help="training split: .tsv/.csv/.jsonl (text, DNA) or labelled shards")
    f.add_argument("--dev", default=None, help="dev split (early stopping, model selection), same kinds")
    f.add_argument("--test", default=None, help="optional test split, scored with the best dev state")
    f.add_argument("--data", default=None, help="a labelled shard folder: its train split trains, its val split is dev")
    f.add_argument("--text_column", default=None, help="table column of the input (DNA default: sequence)")
    f.add_argument("--text_pair_column", default=None, help="table column of the second text of a pair")
    f.add_argument("--label_column", default="label", help="table column of the label (default label)")
    f.add_argument("--task_type", default="classification", choices=["classification", "regression"])
    f.add_argument("--metric", default=None, choices=["accuracy", "f1", "matthews", "pearson", "spearman"],
                   help="model-selection and reported metric (default accuracy / pearson)")
    f.add_argument("--pooling", default=None, choices=["cls", "mean"], help="default cls (audio: mean)")
    f.add_argument("--seeds", type=int, default=3, help="seeds to run; the result is mean ± std (default 3)")
    f.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--max_steps", type=int, default=None, help="cap on optimizer steps")
    f.add_argument("--lr", type=float, default=5e-5)
    f.add_argument("--weight_decay", type=float, default=0.01)
    f.add_argument("--batch_size", type=int, default=32)
    f.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps (then linear decay)")
    f.add_argument("--eval_every", type=int, default=None, help="steps between dev evaluations (default: per epoch)")
    f.add_argument("--patience", type=int, default=3, help="dev evaluations without improvement before stopping")
    f.add_argument("--dropout", type=float, default=None, help="set every dropout to this (default: encoder's own)")
    f.add_argument("--skip_bad", action="store_true", help="skip bad rows (empty or non-string fields, a wrong "
                   "cell count, bad JSONL lines, an input the encoder refuses; counted) instead of stopping")
    f.add_argument("--out", default=None, help="folder for finetune.json and each seed's best checkpoint")
    f.add_argument("--device", default=None, help="torch device (default cuda when available)")
    f.add_argument("--timm_model", default=None, help="timm model name of a timm ViT weights file")
    f.add_argument("--json", action="store_true", help="print the full result as JSON")
    f.set_defaults(fn=cmd_finetune)
