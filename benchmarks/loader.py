"""Loader throughput: the shard pipeline per DataLoader worker count, vs one file per sample, vs training.

For each modality (``text``: ``configs/text_mlm_tiny.yaml``, ``image``: ``configs/image_mae_tiny.yaml``)
the script builds the tiny run (its tokenizer, masker and model, on the embedded data), takes the
first ``--samples`` raw samples of the training shards, and writes them twice into a work folder:

* ``shards/``: 4 tar shards (the format ``mmm shards build`` writes), read by the training
  pipeline itself (:meth:`~mmm.train.datamodule.StreamDataModule.task_loader`: shard shuffle,
  node/worker split, tar reading, shuffle buffer, decode, tokenize or augment, mask, pack);
* ``files/``: one file per sample field (``{key}.txt``, ``{key}.png``, ...), read in a seeded random
  order by a minimal folder dataset that hands the same raw samples to the same modality stages.

It then times, in one process and one run:

* both loaders with 0, 1 and 2 DataLoader workers: packed sequences (samples after chunking; one
  image = one sequence) per second, from the second batch on (worker start-up is left out), for
  ``--batches`` batches;
* the tiny config's training step (forward + backward + fused ``AdamW.step()`` + ``zero_grad``,
  fp32, on batches prepared beforehand): the sequences per second a training run consumes.

* the hand-over of a batch from one worker to the training process (``--transfer-batches``): the time
  ``next()`` takes when the worker already has the batch ready (a pause in between stands for the
  training step), with each batch sent as one message (:mod:`mmm.data.wire`, what training does)
  and the usual way (PyTorch's shared-memory segment per tensor), alternating.

It reports ratios: shards / files at each worker count, and loader / training (> 1: the loader
keeps up with training on its own; the loader and the step share the CPU in a real run, so on 2
cores the ratio with ``num_workers`` workers must be well above 1). ``--quick`` keeps the whole run
under about a minute on 2 CPU cores.

Usage::

    python -m benchmarks.loader [--quick] [--modalities text,image] [--workers 0,1,2] [--batches N]
        [--steps N] [--samples N] [--transfer-batches N] [--threads T] [--micro] [--work DIR] [--json OUT]
        [--markdown OUT]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from benchmarks.report import argument_parser, emit, with_threads

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"text": "configs/text_mlm_tiny.yaml", "image": "configs/image_mae_tiny.yaml"}
SHARDS = 4
MICRO_OVERRIDES = {  # toy sizes for the tests: seconds, meaningless as a measurement
    "text": {"model.encoder.dim": 32, "model.encoder.depth": 1, "model.encoder.heads": 2,
             "model.encoder.mlp_hidden": 64, "model.text.vocab_size": 300, "model.text.tokenizer_train_docs": 50,
             "model.text.max_len": 32, "data.batch_size": 4},
    "image": {"model.encoder.dim": 32, "model.encoder.depth": 1, "model.encoder.heads": 2,
              "model.encoder.mlp_hidden": 64, "model.image.image_size": 16, "data.batch_size": 4},
}


# ----------------------------------------------------------------------------- data


class FolderSamples(IterableDataset):
    """One file per sample field (``{key}.{ext}``): raw samples in a seeded random order, split by worker.

    Args:
        folder: the folder the fields were written to.
        seed: seed of the order (a map-style dataset with ``shuffle=True`` would do the same).
    """

    def __init__(self, folder: Path, seed: int = 0) -> None:
        super().__init__()
        groups: Dict[str, List[Path]] = {}
        for p in sorted(folder.iterdir()):
            key, _, ext = p.name.partition(".")
            groups.setdefault(key, []).append(p)
        self.samples = list(groups.values())
        random.Random(seed).shuffle(self.samples)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        for paths in self.samples[worker::workers]:
            sample: Dict[str, Any] = {"__key__": paths[0].name.partition(".")[0], "__url__": str(paths[0].parent)}
            for p in paths:
                sample[p.name.partition(".")[2]] = p.read_bytes()
            yield sample


def raw_samples(urls: Sequence[str], n: int) -> List[Dict[str, Any]]:
    """The first ``n`` raw samples of ``urls`` in shard order (field name -> bytes)."""
    from mmm.data.stream import make_pipeline

    out = []
    for s in make_pipeline(list(urls), stages=[], shuffle_shards=False, shuffle_buffer=0):
        out.append({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
        if len(out) == n:
            break
    return out


def write_copies(samples: List[Dict[str, Any]], work: Path) -> tuple[List[str], Path]:
    """Write ``samples`` as :data:`SHARDS` tar shards and as one file per field; returns (shard urls, folder)."""
    shard_dir, files = work / "shards", work / "files"
    shard_dir.mkdir(parents=True, exist_ok=True)
    files.mkdir(parents=True, exist_ok=True)
    per = -(-len(samples) // SHARDS)
    urls = []
    for i in range(SHARDS):
        url = shard_dir / f"train-{i:06d}.tar"
        with tarfile.open(url, "w") as tar:
            for s in samples[i * per:(i + 1) * per]:
                for ext, data in s.items():
                    if ext == "__key__":
                        continue
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size, info.mtime = len(data), 0  # integer mtime: no PAX header per member
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(url))
    for s in samples:
        for ext, data in s.items():
            if ext != "__key__":
                (files / f"{s['__key__']}.{ext}").write_bytes(data)
    return urls, files


# ----------------------------------------------------------------------------- timing


def time_loader(loader: Any, batches: int) -> Dict[str, Any]:
    """Sequences/s and batches/s of ``loader`` over ``batches`` batches after the first one."""
    it = iter(loader)
    t_first = time.perf_counter()
    next(it)
    start = time.perf_counter()
    n_batches = n_seqs = n_tokens = 0
    for batch in it:
        n_batches += 1
        n_seqs += batch.num_sequences
        n_tokens += batch.num_tokens
        if n_batches == batches:
            break
    dt = max(time.perf_counter() - start, 1e-9)
    return {"batches": n_batches, "sequences": n_seqs, "tokens": n_tokens, "seconds": dt,
            "first_batch_s": start - t_first, "sequences_per_s": n_seqs / dt, "batches_per_s": n_batches / dt}


def _shutdown(loader: DataLoader) -> None:
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def time_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: List[Any], steps: int,
                  warmup: int) -> Dict[str, Any]:
    """Median step time and sequences/s of fp32 training steps on prepared ``batches`` (cycled)."""
    model.train()
    times, seqs = [], []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss, _ = model(b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            seqs.append(b.num_sequences)
    return {"steps": steps, "median_step_s": statistics.median(times), "steps_per_s": len(times) / sum(times),
            "sequences_per_s": sum(seqs) / sum(times)}


def _usual_way(loader: DataLoader) -> DataLoader:
    """The same loader with the pipeline's last stage, :func:`mmm.data.wire.to_wire`, left out."""
    from mmm.data.wire import to_wire

    stages = list(loader.dataset.pipeline)
    if stages[-1] is not to_wire:
        raise RuntimeError("the training pipeline no longer ends with mmm.data.wire.to_wire")
    return DataLoader(wds.DataPipeline(*stages[:-1]), batch_size=None, num_workers=loader.num_workers,
                      prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)


def time_transfer(make_loader, batches: int, pause_s: float, rounds: int = 2) -> Dict[str, Any]:
    """Median ms that ``next()`` takes on a one-worker loader whose worker has the batch ready, with batches
    as one message and the usual way, ``rounds`` alternating rounds of ``batches`` each."""
    times: Dict[str, List[float]] = {"one message": [], "usual way": []}
    for _ in range(rounds):
        for way in times:
            loader = make_loader() if way == "one message" else _usual_way(make_loader())
            it = iter(loader)
            next(it)
            for _ in range(batches):
                time.sleep(pause_s)  # the training step: the worker gets ahead
                t0 = time.perf_counter()
                next(it)
                times[way].append((time.perf_counter() - t0) * 1e3)
            _shutdown(loader)
    med = {way: statistics.median(ts) for way, ts in times.items()}
    return {"batches": batches * rounds, "pause_s": pause_s, "one_message_ms": med["one message"],
            "usual_way_ms": med["usual way"], "speedup": med["usual way"] / max(med["one message"], 1e-9)}


def run_modality(modality: str, work: Path, workers: Sequence[int], batches: int, steps: int, samples: int,
                 micro: bool, log=print, transfer_batches: int = 0) -> Dict[str, Any]:
    """Every measurement of one modality (see the module docstring)."""
    from mmm.config import load_config
    from mmm.data.epoch import EpochCounter
    from mmm.data.stream import SampleErrorHandler
    from mmm.data.wire import to_wire
    from mmm.train.datamodule import StreamDataModule
    from mmm.train.pretrain import build_run

    overrides = {"trainer.default_root_dir": str(work / "run"), "data.val": None,
                 "trainer.enable_progress_bar": False, **(MICRO_OVERRIDES[modality] if micro else {})}
    run = build_run(load_config(REPO / CONFIGS[modality], overrides))
    cfg = run.cfg
    urls, folder = write_copies(raw_samples(run.datamodule.tasks[0].train_urls, samples), work)
    base = run.datamodule.tasks[0]
    result: Dict[str, Any] = {"modality": modality, "config": CONFIGS[modality], "batch_size": cfg.data.batch_size,
                              "shuffle_buffer": cfg.data.shuffle_buffer, "samples": samples, "shards": len(urls),
                              "loaders": []}

    def folder_loader(w: int) -> DataLoader:
        stages = base.make_stages(seed=cfg.data.seed, handler=SampleErrorHandler(), fixed_masking=False,
                                  epochs=EpochCounter(0), train=True)
        # handed over as the training loader's batches are (mmm.data.wire), so shards / files compares the reading
        wire = [to_wire] if w else []
        return DataLoader(wds.DataPipeline(FolderSamples(folder, cfg.data.seed), *stages, *wire), batch_size=None,
                          num_workers=w, prefetch_factor=4 if w else None)

    for w in workers:
        dm = StreamDataModule(dataclasses.replace(cfg.data, num_workers=w),
                              [dataclasses.replace(base, train_urls=urls, val_urls=None)])
        for source, loader in (("shards", dm.task_loader()), ("files", folder_loader(w))):
            r = time_loader(loader, batches)
            _shutdown(loader)
            result["loaders"].append({"source": source, "workers": w, **r})
            log(f"  {modality} {source:6s} workers={w}: {r['sequences_per_s']:,.0f} sequences/s "
                f"({r['batches']} batches)")

    if transfer_batches:
        dm1 = StreamDataModule(dataclasses.replace(cfg.data, num_workers=1),
                               [dataclasses.replace(base, train_urls=urls, val_urls=None)])
        tr = time_transfer(dm1.task_loader, transfer_batches, pause_s=0.02 if micro else 0.15)
        result["transfer"] = tr
        log(f"  {modality} batch hand-over from 1 worker: {tr['one_message_ms']:.2f} ms as one message, "
            f"{tr['usual_way_ms']:.2f} ms the usual way ({tr['speedup']:.1f}×)")

    prepared = []
    for b in StreamDataModule(dataclasses.replace(cfg.data, num_workers=0),
                              [dataclasses.replace(base, train_urls=urls, val_urls=None)]).task_loader():
        prepared.append(b)
        if len(prepared) == 4:
            break
    opt = run.module.configure_optimizers()["optimizer"]
    train = time_training(run.module.model, opt, prepared, steps, warmup=2)
    result["train"] = train
    log(f"  {modality} training step: {train['median_step_s'] * 1e3:.1f} ms, {train['sequences_per_s']:,.0f} sequences/s")
    files = {r["workers"]: r["sequences_per_s"] for r in result["loaders"] if r["source"] == "files"}
    for r in result["loaders"]:
        r["vs_training"] = r["sequences_per_s"] / train["sequences_per_s"]
        if r["source"] == "shards":
            r["shards_vs_files"] = r["sequences_per_s"] / files[r["workers"]]
    return result


# ----------------------------------------------------------------------------- report


def markdown(results: List[Dict[str, Any]], env: Dict[str, Any]) -> str:
    """The results as one markdown table (plus the training-rate line per modality)."""
    lines = [f"Loader vs training, CPU ({env['cpu_count']} cores, {env['threads']} torch threads in the training "
             f"step), torch {env['torch']}. Sequences/s from the second batch on; training = fp32 step of the tiny "
             "config on prepared batches.", "",
             "| modality | source | workers | sequences/s | × training rate | shards / files |",
             "|---|---|---:|---:|---:|---:|"]
    for res in results:
        for r in res["loaders"]:
            ratio = f"{r['shards_vs_files']:.2f}×" if "shards_vs_files" in r else ""
            lines.append(f"| {res['modality']} | {'tar shards' if r['source'] == 'shards' else 'one file per sample'} | "
                         f"{r['workers']} | {r['sequences_per_s']:,.0f} | {r['vs_training']:.2f}× | {ratio} |")
        t = res["train"]
        lines.append(f"| {res['modality']} | training step ({res['config']}, batch {res['batch_size']}) | | "
                     f"{t['sequences_per_s']:,.0f} | 1.00× | |")
    transfers = [res for res in results if "transfer" in res]
    if transfers:
        lines += ["", "Hand-over of a ready batch from 1 worker to the training process (median ms of `next()`, "
                  "alternating rounds):", "",
                  "| modality | batches | as one message (mmm.data.wire) | the usual way (a shared-memory segment "
                  "per tensor) | speed-up |", "|---|---:|---:|---:|---:|"]
        for res in transfers:
            tr = res["transfer"]
            lines.append(f"| {res['modality']} | {tr['batches']} | {tr['one_message_ms']:.2f} | "
                         f"{tr['usual_way_ms']:.2f} | {tr['speedup']:.1f}× |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="fewer batches and steps (under a minute on 2 cores)")
    p.add_argument("--micro", action="store_true", help="toy models and counts (tests; not a measurement)")
    p.add_argument("--modalities", default="text,image")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated")
    p.add_argument("--batches", type=int, default=None, help="timed batches per loader (default 60, quick 25)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 20, quick 6)")
    p.add_argument("--samples", type=int, default=None, help="raw samples copied into shards and files")
    p.add_argument("--transfer-batches", type=int, default=None,
                   help="batches per way and round in the hand-over timing (default 20, quick 10; 0: skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; returns the JSON-able result (also written to ``--json`` if given)."""
    args = parse_args(argv)
    return with_threads(args.threads, lambda: _in_work_folder(args))


def _in_work_folder(args: argparse.Namespace) -> Dict[str, Any]:
    if args.work:
        return _run(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="mmm_loader_bench_") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    batches = args.batches or (2 if args.micro else 25 if args.quick else 60)
    steps = args.steps or (1 if args.micro else 6 if args.quick else 20)
    workers = [int(w) for w in args.workers.split(",")]
    transfer = args.transfer_batches if args.transfer_batches is not None else (2 if args.micro else 10 if args.quick
                                                                                else 20)
    env = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count()}
    results = []
    for modality in args.modalities.split(","):
        if modality not in CONFIGS:
            raise ValueError(f"unknown modality {modality!r}; the loader benchmark knows {sorted(CONFIGS)}")
        samples = args.samples or (40 if args.micro else {"text": 1500, "image": 2000}[modality])
        print(f"== loader benchmark: {modality}")
        results.append(run_modality(modality, work / modality, workers, batches, steps, samples, args.micro,
                                    transfer_batches=transfer))
    table = markdown(results, env)
    report = {"env": env, "quick": bool(args.quick), "micro": bool(args.micro), "results": results, "markdown": table}
    emit(table, report, args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
