"""The ``mmm`` command.

    mmm demo [--out DIR] [--parts text,image,...] [--max_steps N] [--full]
    mmm pretrain --config configs/text_mlm_tiny.yaml [--trainer.max_steps 50 ...] [--print_config]
    mmm prepare --config configs/audio_mam_tiny.yaml [--trainer.default_root_dir DIR ...]   (fit assets offline)
    mmm shards build INPUT OUTPUT [--dataset text] [--max_chars 2000] [--val_fraction 0.01] ...
    mmm shards check DIR [--dataset NAME] [--split train|val]        (exit 0: ok, 1: problems, 2: usage)
    mmm shards stats DIR [--split ...] [--tokenizer DIR] [--max_len 128] [--json OUT]
    mmm export hf CHECKPOINT OUT_DIR
    mmm list [KIND]
    mmm --debug <command> ...       (or MMM_DEBUG=1: show the full traceback of an error)
    mmm --plugin MODULE <command>   (or MMM_PLUGINS=MODULE: import a third-party modality, dataset, ... first)
    mmm embed SOURCE INPUT OUT --modality M [--pooling cls|mean]      (features as .npy + keys)
    mmm finetune SOURCE --modality M --train F --dev F [--text_column ...] [--seeds 3] (mean ± std)
    mmm bench --suite throughput|eval [--quick] [--out DIR] [--compile] [CKPT]
    mmm bench --suite downstream [--quick] CKPT [CKPT ...]            (probes, kNN, fine-tuning vs random init)
    mmm bench --suite recipes --modality text|dna|image|audio|vl [--quick]   (methods at equal training FLOPs)

Overrides follow LightningCLI / jsonargparse conventions: ``--section.key value`` or
``--section.key=value``, values parsed as YAML; an unknown key is an error naming it.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mmm.config import ConfigError, dump_config, load_config, parse_override_value
from mmm.data.stream import SampleError
from mmm.errors import UserError, one_line
from mmm.registry import RegistryError

DEBUG_ENV = "MMM_DEBUG"
"""Environment variable: ``MMM_DEBUG=1`` shows the full traceback of an error (as ``mmm --debug``)."""

USER_ERRORS = (UserError, ConfigError, RegistryError, SampleError, ValueError, OSError, FloatingPointError)
"""Errors about the user's input: printed as their one-line message, exit code 2. Anything else is
unexpected: printed with its type and a hint to rerun with ``--debug``, exit code 1."""


def parse_overrides(args: Sequence[str]) -> Dict[str, Any]:
    """``["--trainer.max_steps", "50", "--data.seed=3"]`` → ``{"trainer.max_steps": 50, "data.seed": 3}``."""
    out: Dict[str, Any] = {}
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) <= 2:
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.key value")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            raw = args[i + 1]
            i += 2
        out[key] = parse_override_value(raw)
    return out


def _require_config(ns: argparse.Namespace, what: str) -> None:
    """Refuse to run on the built-in defaults by accident: ``--config`` or an explicit ``--defaults``."""
    if ns.config is not None or ns.defaults:
        return
    presets = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    raise ConfigError("no --config given: name a YAML config (e.g. --config configs/text_mlm_tiny.yaml"
                      + (f"; presets in configs/: {', '.join(presets)}" if presets else "")
                      + f"), or pass --defaults to {what} with the built-in defaults (trainer.max_steps 1000, "
                      "trainer.default_root_dir runs/mmm, unless overridden)")


def _cmd_pretrain(ns: argparse.Namespace, rest: List[str]) -> int:
    overrides = parse_overrides(rest)
    if not ns.print_config:
        _require_config(ns, "train")
    cfg = load_config(ns.config, overrides)
    if ns.print_config:
        print(dump_config(cfg))
        return 0
    from mmm.train.pretrain import pretrain

    run = pretrain(cfg)
    print(f"run folder: {run.run_dir}\nlast checkpoint: {run.last_checkpoint}")
    return 0


def _cmd_check_syncs(ns: argparse.Namespace, rest: List[str]) -> int:
    overrides = parse_overrides(rest)
    _require_config(ns, "check")
    cfg = load_config(ns.config, overrides)
    from mmm.train.step_reads import loop_host_reads, step_host_reads

    reads = step_host_reads(cfg)
    print(reads.report())
    unplanned = reads.unplanned()
    print(f"{len(unplanned)} place(s) in the training step (one per task) would make a CUDA device wait for the host"
          + (" (each is a host-device sync on a GPU)" if unplanned else ""))
    if not ns.loop:
        return 1 if unplanned else 0
    loop = loop_host_reads(cfg, ns.loop)
    between = loop.between_logging()
    print(f"\n{ns.loop} steps through Lightning's loop (logging at steps {', '.join(map(str, loop.logged))}; "
          f"checked: {', '.join(map(str, loop.quiet_steps()))}):")
    print(loop.report())
    print(f"{len(between)} place(s) read back between logging steps (beyond the training step's planned reads)")
    return 1 if unplanned or between else 0


def _cmd_prepare(ns: argparse.Namespace, rest: List[str]) -> int:
    overrides = parse_overrides(rest)
    _require_config(ns, "fit assets")
    cfg = load_config(ns.config, overrides)
    from mmm.train.tasks import prepare_run_assets

    mods = prepare_run_assets(cfg)
    run_dir = Path(cfg.trainer.default_root_dir)
    for name, files in mods.assets().items():
        if files:
            print(f"{name}: {', '.join(sorted(files))}")
    print(f"assets in {run_dir.resolve()}: `mmm pretrain` with --trainer.default_root_dir {run_dir} reuses them")
    return 0


def _cmd_demo(ns: argparse.Namespace, rest: List[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    from mmm.demo import check_demo_args, run_demo

    parts = [p.strip() for p in ns.parts.split(",") if p.strip()] if ns.parts is not None else None
    check_demo_args(parts, ns.max_steps, ns.config, ns.full)
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"mmm demo: writing to {out}", flush=True)
    m = run_demo(out, parts, ns.max_steps, progress_bar=not ns.no_progress, config=ns.config, quick=ns.quick,
                 full=ns.full)["parts"]
    if "text" in m:
        tr, un, uni = (m["text"]["held_out"][k] for k in ("trained", "untrained", "unigram"))
        print(f"text: held-out masked-token accuracy trained {tr['accuracy']:.3f} vs untrained {un['accuracy']:.3f} "
              f"(unigram baseline {uni['accuracy']:.3f}); perplexity {tr['perplexity']:.1f} vs {un['perplexity']:.1f} "
              f"(unigram {uni['perplexity']:.1f})")
    for part, metrics in m.items():
        probe = metrics.get("linear_probe")
        if probe:
            print(f"{part}: linear-probe accuracy trained {probe['trained']['accuracy']:.3f} vs untrained "
                  f"{probe['untrained']['accuracy']:.3f} (chance {probe['trained']['chance']:.3f})")
    if "vl" in m:
        tr, un = m["vl"]["scores"]["trained"], m["vl"]["scores"]["untrained"]
        r, ru = tr["retrieval"], un["retrieval"]
        itm = ("no itm head" if tr.get("itm_chance") is None else f"ITM accuracy {tr['itm_accuracy']:.3f} vs "
               f"{un['itm_accuracy']:.3f} (majority label {tr['itm_chance']:.3f})")
        print(f"vl: text->image R@1 trained {r['t2i']['1']:.3f} vs untrained {ru['t2i']['1']:.3f} (chance "
              f"{r['t2i_chance']['1']:.3f}); {itm}")
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_shards(ns: argparse.Namespace, rest: List[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    import datasets_def  # noqa: F401
    from mmm.registry import DATASETS

    import inspect

    ds = DATASETS.create(ns.dataset)
    accepted = inspect.signature(ds.build_shards).parameters
    options = {k: getattr(ns, k) for k in ("samples_per_shard", "max_chars", "jsonl_field", "labels", "captions", "regions",
                                           "feature_dim", "window", "stride", "sample_rate", "max_seconds") if getattr(ns, k) is not None}
    if isinstance(ns.labels, str) and ns.labels.strip().lower() == "none":
        options["labels"] = None  # explicitly no labels (a file named "none" is passed as ./none)
    contract = ("val_fraction", "seed", "skip_bad", "overwrite")
    lacking = [k for k in contract if k not in accepted]
    if len(accepted) < 2 or lacking:
        raise ConfigError(f"mmm shards build --dataset {ns.dataset}: its build_shards{inspect.signature(ds.build_shards)} "
                          f"does not take {lacking or 'the input and output paths'}; a dataset definition's builder is "
                          f"build_shards(input, output, *, val_fraction, seed, skip_bad, overwrite, **options) -> "
                          f"BuildReport (datasets_def/building.py)")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())  # build_shards(..., **options)
    wrong = [] if takes_any else sorted(k for k in options if k not in accepted)
    if wrong:
        raise ConfigError(f"mmm shards build --dataset {ns.dataset}: option(s) {['--' + k for k in wrong]} do not apply "
                          f"to this dataset")
    try:
        report = ds.build_shards(ns.input, ns.output, val_fraction=ns.val_fraction, seed=ns.seed,
                                 skip_bad=ns.skip_bad, overwrite=ns.overwrite, **options)
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        # a write deep in a tar writer names no file: a full disk is the output's, anything else is named as a build
        where = ns.output if e.errno == errno.ENOSPC else f"building {ns.input} into {ns.output}"
        raise OSError(e.errno, e.strerror or str(e), str(where)) from e
    if not all(hasattr(report, a) for a in ("shards", "skipped")):
        raise ConfigError(f"mmm shards build --dataset {ns.dataset}: build_shards returned {type(report).__name__}, "
                          f"not a BuildReport (datasets_def/building.py); the shards in {ns.output} were written")
    counts = next((getattr(report, a) for a in ("chunks", "samples", "windows") if isinstance(getattr(report, a, None), dict)), {})
    print(f"wrote {sum(len(s) for s in report.shards.values())} shards to {ns.output}: "
          + ", ".join(f"{split}: {counts.get(split, 0)} samples" for split in sorted(counts)))
    if report.skipped:
        print(f"skipped {len(report.skipped)} bad input(s) (listed in manifest.json), e.g. {report.skipped[0]}")
    return 0


def _cmd_shards_check(ns: argparse.Namespace, rest: List[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    from mmm.data.shard_tools import check_shards

    report = check_shards(ns.path, dataset=ns.dataset, split=ns.split)
    print(report.to_text())
    return 0 if report.ok else 1


def _cmd_shards_stats(ns: argparse.Namespace, rest: List[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    import json

    from mmm.data.shard_tools import shard_stats

    stats = shard_stats(ns.path, dataset=ns.dataset, split=ns.split, tokenizer=ns.tokenizer, max_len=ns.max_len)
    print(stats.to_markdown())
    if ns.json:
        out = Path(ns.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(stats.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


def _cmd_export(ns: argparse.Namespace, rest: List[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    from mmm.interop.hf import export_command

    export_command(ns.checkpoint, ns.out)  # prints what was written and how to load it
    return 0


def _cmd_list(ns: argparse.Namespace, rest: List[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    import datasets_def  # noqa: F401
    import mmm.core.encoder  # noqa: F401
    import mmm.masking  # noqa: F401
    import mmm.modalities  # noqa: F401
    import mmm.model  # noqa: F401
    from mmm import registry

    from mmm.downstream.tasks import downstream_tasks

    kinds = {r.kind: r.list for r in vars(registry).values() if isinstance(r, registry.Registry)}
    kinds["task"] = lambda: list(downstream_tasks())  # the modalities' downstream tasks (mmm finetune --task)
    if ns.kind is not None and ns.kind not in kinds:
        raise RegistryError(f"unknown kind {ns.kind!r}; known kinds: {', '.join(sorted(kinds))}")
    for kind, names in sorted(kinds.items()):
        if ns.kind in (None, kind):
            print(f"{kind}: {', '.join(names())}")
    return 0


def _cmd_bench(ns: argparse.Namespace, rest: List[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments {rest}")
    from benchmarks.suite import run_suite

    report = run_suite(ns.suite, ns.out, ns.quick, ns.checkpoint, ns.compile, modality=ns.modality)
    print(f"\nmmm bench: results in {Path(report['out']).resolve()}\n")
    print(report["markdown"])
    return 0


def _add_shard_selection(p: argparse.ArgumentParser) -> None:
    """``--dataset`` and ``--split``, shared by the shard tools that read existing shards."""
    p.add_argument("--dataset", default=None, help="dataset definition (default: the one the shards' manifest.json "
                   "names, else text)")
    p.add_argument("--split", default=None, choices=["train", "val"], help="only this split's shards (default all)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmm", description="Multimodal masked modeling.")
    p.add_argument("--debug", action="store_true", help=f"show the full traceback of an error (also {DEBUG_ENV}=1)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module (dotted name, or a .py file) that registers third-party parts (modalities, "
                        "datasets, maskers, objectives) before the command runs; repeatable; also the MMM_PLUGINS "
                        "environment variable (comma-separated) and the mmm.plugins entry points")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="pretrain a tiny model per modality on the embedded data and write a report")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--parts", default=None, help="comma-separated parts: text,image,dna,audio,vl (default all)")
    d.add_argument("--config", default=None, help="replace the config of the single part chosen with --parts")
    d.add_argument("--max_steps", type=int, default=None, help="override trainer.max_steps (>= 1)")
    d.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    d.add_argument("--quick", action="store_true", help="small evaluation sets (smoke tests)")
    d.add_argument("--full", action="store_true",
                   help="each part's longer schedule (mmm.demo.FULL_SCHEDULES; half an hour or more on 2 CPU "
                        "cores, against about 12 min by default): larger gains over the initialisation")
    d.set_defaults(fn=_cmd_demo)

    r = sub.add_parser("prepare", help="fit a config's assets (tokenizer, statistics, k-means codebooks) into its "
                                       "run folder without training; pretrain reuses them")
    r.add_argument("--config", default=None, help="YAML config file")
    r.add_argument("--defaults", action="store_true", help="without --config: the built-in defaults plus overrides")
    r.set_defaults(fn=_cmd_prepare)

    t = sub.add_parser("pretrain", help="pretrain from a YAML config; --section.key value overrides")
    t.add_argument("--config", default=None, help="YAML config file")
    t.add_argument("--print_config", action="store_true", help="print the resolved config (with comments) and exit")
    t.add_argument("--defaults", action="store_true", help="train without --config: the built-in defaults plus overrides")
    t.set_defaults(fn=_cmd_pretrain)

    cs = sub.add_parser("check-syncs", help="run one training step of a config on the CPU and list every call in it "
                                            "that would make a GPU wait for the host; exit 1 if any (beyond the "
                                            "per-step loss check)")
    cs.add_argument("--config", default=None, help="YAML config file")
    cs.add_argument("--defaults", action="store_true", help="without --config: the built-in defaults plus overrides")
    cs.add_argument("--loop", type=int, default=0, metavar="STEPS",
                    help="also train STEPS steps through Lightning's loop (logging, progress bar, callbacks, optimizer) "
                         "and list the reads per step; exit 1 if any falls between logging steps")
    cs.set_defaults(fn=_cmd_check_syncs)

    s = sub.add_parser("shards", help="WebDataset shard tools")
    ssub = s.add_subparsers(dest="shards_command", required=True)
    b = ssub.add_parser("build", help="build shards from a folder of raw files")
    b.add_argument("input", help="input folder or file: .txt/.jsonl (text), images (image, image_text), FASTA (dna), wav/flac (audio)")
    b.add_argument("output", help="output folder for {train,val}-NNNNNN.tar")
    b.add_argument("--dataset", default="text", help="dataset definition: text, image, image_text, dna, audio (default text)")
    b.add_argument("--samples_per_shard", type=int, default=None, help="samples per tar shard (dataset default)")
    b.add_argument("--max_chars", type=int, default=None, help="text: longest chunk in characters (default 2000)")
    b.add_argument("--jsonl_field", default=None, help="text: field holding the text in .jsonl files")
    b.add_argument("--labels", default=None, help="image: 'folders' (default; a flat folder gets no labels) or a CSV; dna: a "
                                              "BED/TSV file; audio: 'folders' or a CSV; 'none': no labels")
    b.add_argument("--captions", default=None, help="image, image_text: CSV/JSONL of captions per file")
    b.add_argument("--regions", default=None, help="image_text: folder of <image path>.npz region files (features, boxes, soft)")
    b.add_argument("--feature_dim", type=int, default=None, help="image_text: expected region feature size (default: the first file's)")
    b.add_argument("--window", type=int, default=None, help="dna: window length in bases (default 1024)")
    b.add_argument("--stride", type=int, default=None, help="dna: window stride in bases (default = window)")
    b.add_argument("--sample_rate", type=int, default=None, help="audio: resample to this rate (default 16000)")
    b.add_argument("--max_seconds", type=float, default=None, help="audio: cut longer clips into windows of this length")
    b.add_argument("--val_fraction", type=float, default=0.0, help="fraction of documents for the val split")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--skip_bad", action="store_true", help="skip (and report) bad files/lines instead of stopping")
    b.add_argument("--overwrite", action="store_true", help="replace shards already in OUTPUT")
    b.set_defaults(fn=_cmd_shards)
    c = ssub.add_parser("check", help="read every shard and list problems; exit 0 if none, 1 if any, 2 on usage errors")
    c.add_argument("path", help="shard folder (its manifest.json is compared too), .tar file or pattern")
    _add_shard_selection(c)
    c.set_defaults(fn=_cmd_shards_check)
    st = ssub.add_parser("stats", help="samples, characters, tokens (or words), length histogram and percentiles")
    st.add_argument("path", help="shard folder, .tar file or pattern")
    _add_shard_selection(st)
    st.add_argument("--tokenizer", default=None, help="saved tokenizer folder; without it, whitespace words are counted")
    st.add_argument("--max_len", type=int, default=None, help="with --tokenizer: also count sequences cut at this length")
    st.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    st.set_defaults(fn=_cmd_shards_stats)

    e = sub.add_parser("export", help="export an encoder to another library's format")
    esub = e.add_subparsers(dest="export_format", required=True)
    h = esub.add_parser("hf", help="HF transformers BERT (config.json + model.safetensors + vocab.txt)")
    h.add_argument("checkpoint", help="mmm checkpoint (.ckpt)")
    h.add_argument("out", help="output folder")
    h.set_defaults(fn=_cmd_export)

    from mmm.downstream.commands import add_commands as add_downstream_commands

    add_downstream_commands(sub)  # mmm embed, mmm finetune

    li = sub.add_parser("list", help="list registered components and downstream tasks (kind: one of them, e.g. task)")
    li.add_argument("kind", nargs="?", default=None)
    li.set_defaults(fn=_cmd_list)

    be = sub.add_parser("bench", help="benchmark suites: throughput (mmm vs HF, attention backends, GPU MFU), "
                                      "eval (a checkpoint vs random init on held-out data), downstream (probes, "
                                      "kNN, fine-tuning of checkpoints) or recipes (methods at equal FLOPs)")
    be.add_argument("--suite", required=True, choices=["throughput", "eval", "downstream", "recipes"],
                    help="which suite to run")
    be.add_argument("--modality", default=None, choices=["text", "dna", "image", "audio", "vl"],
                    help="--suite recipes: the modality whose pretraining recipes are compared at equal training FLOPs")
    be.add_argument("--quick", action="store_true", help="fewer steps, smaller sweeps, fewer seeds (throughput and "
                    "eval: a few minutes on CPU; recipes: still every recipe, 2 seeds)")
    be.add_argument("--out", default=None, help="output folder (default runs/bench/<suite>; recipes: "
                    "runs/bench/recipes_<modality>)")
    be.add_argument("--compile", action="store_true", help="torch.compile the mmm model in the GPU MLM step")
    be.add_argument("checkpoint", nargs="*", default=None, help="mmm checkpoint (.ckpt) for --suite eval; one or "
                    "several checkpoints / encoder folders for --suite downstream")
    be.set_defaults(fn=_cmd_bench)
    return p


def _command_name(ns: argparse.Namespace) -> str:
    """``pretrain``, ``shards build``, ``export hf``: the words of the command that failed."""
    words = [getattr(ns, k, None) for k in ("command", "shards_command", "export_format")]
    return " ".join(w for w in words if w)


def _plugin_args(given: List[str], rest: List[str]):
    """The ``--plugin`` modules given before the command plus those after it (``--plugin M`` / ``--plugin=M``,
    which argparse leaves in ``rest``), and ``rest`` without them."""
    plugins, left, i = list(given), [], 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--plugin":
            if i + 1 >= len(rest):
                raise SystemExit("mmm: error: argument --plugin: expected one argument")
            plugins.append(rest[i + 1])
            i += 2
            continue
        if arg.startswith("--plugin="):
            plugins.append(arg.split("=", 1)[1])
        else:
            left.append(arg)
        i += 1
    return plugins, left


HELP_FLAGS = frozenset({"-h", "--help"})


def _load_plugins_for_help(argv: List[str]) -> None:
    """Import the plug-ins named anywhere in ``argv`` (and by ``$MMM_PLUGINS`` / entry points) before a help is
    printed, so that it lists their names too (``mmm --plugin M finetune --help``: the plug-in's tasks). A plug-in
    that fails to import is a warning here: the help is still printed, with the built-in names only."""
    from mmm.plugins import load_plugins

    try:
        plugins, _ = _plugin_args([], argv)
    except SystemExit:  # a trailing `--plugin` without a module: argparse reports it, or prints the help
        plugins = []
    try:
        load_plugins([p for p in plugins if p not in HELP_FLAGS])  # `--plugin -h` asks for the help
    except USER_ERRORS as e:
        print(f"mmm: warning: {one_line(e, True)}; the help lists the built-in names only", file=sys.stderr)


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone (a pipe closed early: ``mmm list | head -1``); if so, stdout is pointed at
    /dev/null so that the interpreter's final flush does not fail again. A broken pipe elsewhere (a ``pipe:`` shard
    command) is not this: stdout then still has its reader."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        closed = any(events & select.POLLERR for _, events in poller.poll(0))  # a pipe with no reader left
        if closed:
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        return closed
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, a test's StringIO)
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``mmm`` command; returns its exit code.

    A failure ends as one line ``mmm <command>: error: ...`` on stderr: a user error (bad config
    value, missing or corrupt file, refused checkpoint, bad sample, full disk) with its message and
    exit code 2; anything else with its type, its message and a hint to rerun with ``--debug`` (or
    ``MMM_DEBUG=1``), exit code 1. With ``--debug`` the traceback is printed first.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints through its own handler
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if HELP_FLAGS.intersection(argv):  # argparse prints a help while parsing: load the plug-ins first
        _load_plugins_for_help(argv)
        ns, rest = parser.parse_known_args(argv)
        plugins, rest = _plugin_args(ns.plugin, rest)
    else:
        # `--plugin M` anywhere: taken out before argparse, which would read the module as the command's first
        # positional (`mmm embed --plugin M SOURCE INPUT OUT`) and the last positional as the plug-in
        plugins, argv = _plugin_args([], argv)
        ns, rest = parser.parse_known_args(argv)
        plugins += ns.plugin  # an abbreviation argparse accepts (`--plug M`)
    debug = ns.debug or "--debug" in rest or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    rest = [a for a in rest if a != "--debug"]  # `mmm pretrain ... --debug` works too
    name = _command_name(ns)
    try:
        from mmm.plugins import load_plugins

        load_plugins(plugins)
        return ns.fn(ns, rest)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"mmm {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: no user sees a raw traceback unless asked for it
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            return 0  # the reader of stdout stopped early (`mmm list | head -1`): what it read was the output
        known = isinstance(e, USER_ERRORS)
        if debug:
            traceback.print_exc()
        print(f"mmm {name}: error: {one_line(e, known)}", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
