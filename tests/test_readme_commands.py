"""Every command the README shows runs, at smoke size, in a fresh process, in README order.

The commands are read from the README's ``bash`` code blocks, so a command added to or changed in
the README is tested without editing this file; a command this file has no smoke recipe for fails
the test (add a recipe to :func:`smoke`). They run in one working folder, as a user following the
README would: ``mmm demo`` writes ``runs/demo`` that ``mmm export`` later reads, the shard builders
read inputs this test generates under the names the README uses (``corpus/``, ``photos/``,
``genome.fa.gz``, ``peaks.bed``, ``clips/``, ``captions.csv``, ``regions/``).

Smoke size: training commands get ``--trainer.max_steps 2`` (a resume gets 4), fine-tuning one seed of
4 steps, benchmarks their
``micro`` sizes (``$MMM_BENCH_MICRO``), and the GPU presets are shrunk to a 1-block CPU model on
the same shards (their ``bf16``/multi-GPU trainer settings replaced); a ``torchrun``/``srun``
launch runs its ``mmm pretrain`` as one CPU process on the text shards the README built. Commands
that cannot run here (the test suite itself) are listed with the reason by
:func:`test_commands_skipped_here_are_listed_with_a_reason`.
"""
from __future__ import annotations

import csv
import gzip
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent

FAST_TRAIN = ["--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "2",
              "--trainer.limit_val_batches", "1", "--trainer.checkpoint_every_n_steps", "2", "--data.num_workers", "0"]
# GPU presets (bf16, several devices, BERT-base width) shrunk to seconds on the CPU; the data path,
# asset fitting and the preset's model family are what the smoke run exercises.
CPU_SHRINK = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
              "--trainer.precision", "32-true", "--trainer.strategy", "auto", "--trainer.compile", "false",
              "--trainer.accumulate_grad_batches", "1", "--data.global_batch_size", "null", "--data.batch_size", "4",
              "--data.shuffle_buffer", "0", "--data.resampled", "false", "--data.epoch_batches", "null",
              "--model.encoder.depth", "1", "--model.encoder.dim", "32", "--model.encoder.heads", "2",
              "--model.encoder.mlp_hidden", "64", "--optim.warmup_steps", "1"]
PRESET_SHRINK = {
    "text_mlm_bert_base.yaml": ["--model.text.vocab_size", "300", "--model.text.max_len", "64"],
    "text_mlm_mosaicbert_base.yaml": ["--model.text.vocab_size", "300", "--model.text.max_len", "64"],
    # its shards/train is a placeholder path: the smoke run reads the text shards the README built
    "text_mlm_bert_base_fsdp.yaml": ["--model.text.vocab_size", "300", "--model.text.max_len", "64",
                                     "--data.train", "shards/text", "--data.val", "shards/text"],
    "dna_mlm_base.yaml": ["--model.dna.vocab_size", "300", "--model.dna.max_len", "64"],
    "image_mae_vit_base.yaml": ["--model.image.image_size", "32", "--model.image.patch_size", "8",
                                "--objectives.0.args", "{decoder_dim: 16, decoder_depth: 1, decoder_heads: 2}"],
    "audio_mam_base.yaml": [],
    "vl_uniter_base.yaml": [],
}
BENCH_MICRO = ["--steps", "1", "--warmup", "1", "--no-memory", "--depth", "1", "--dim", "32", "--heads", "2",
               "--mlp-hidden", "64", "--vocab", "300", "--max-len", "32", "--batch", "4"]


@dataclass
class Command:
    """One README command: its text, the block it came from, and how this test runs it."""

    text: str
    argv: List[str]
    block: int
    env: Dict[str, str] = field(default_factory=dict)
    skip: Optional[str] = None


def readme_commands(readme: Path = README) -> List[Command]:
    """Every command line of the README's ``bash`` blocks (continuations joined, comments dropped)."""
    text = readme.read_text(encoding="utf-8")
    out: List[Command] = []
    for i, block in enumerate(re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(Command(line.split("  #")[0].strip(), words, i))
    return out


def _config_name(argv: List[str]) -> Optional[str]:
    return Path(argv[argv.index("--config") + 1]).name if "--config" in argv else None


def smoke(cmd: Command) -> Command:
    """Rewrite ``cmd`` to its smoke-size form (or mark it skipped, with the reason)."""
    argv = list(cmd.argv)
    if argv[:2] == ["bash", ".ci/setup"] and "&&" in argv:  # this process already runs in the set-up venv
        argv = argv[argv.index("&&") + 1:]
    if argv[0] in ("torchrun", "srun"):  # a multi-node launch: its `mmm pretrain` runs as one CPU process here
        start = argv.index("mmm.cli") + 1 if "mmm.cli" in argv else next(
            i + 1 for i, a in enumerate(argv) if a.endswith("/mmm"))
        argv = ["mmm"] + argv[start:]
    exe = argv[0]
    if exe.endswith("python") and argv[1:3] == ["-m", "pytest"]:
        cmd.skip = "runs the test suite itself (CI runs `python -m pytest -q`; `-m slow`/`-m gpu` select other tests)"
        return cmd
    if exe.endswith("/mmm") or exe == "mmm":
        argv = [str(VENV_BIN / "mmm")] + argv[1:]
        sub = argv[1]
        if sub == "demo":
            argv += ["--max_steps", "2", "--quick", "--no_progress"]
        elif sub in ("pretrain", "prepare"):
            if "--print_config" in argv:
                cmd.argv = argv
                return cmd
            preset = _config_name(argv)
            if preset in PRESET_SHRINK:
                argv += CPU_SHRINK + PRESET_SHRINK[preset]
            if sub == "pretrain":
                steps = "4" if "--trainer.ckpt_path" in argv else "2"
                argv += FAST_TRAIN + ["--trainer.max_steps", steps]
        elif sub == "bench":
            cmd.env["MMM_BENCH_MICRO"] = "1"
        elif sub == "finetune":
            argv += ["--seeds", "1", "--max_steps", "4"]
        elif sub in ("shards", "export", "list", "embed"):
            pass
        else:
            raise AssertionError(f"README command {cmd.text!r}: no smoke recipe for `mmm {sub}` in {__file__}")
    elif exe.endswith("python") and argv[1] == "-m" and argv[2].startswith("benchmarks."):
        argv = [sys.executable] + argv[1:]
        if argv[2] == "benchmarks.text_mlm_step":
            argv += BENCH_MICRO
        elif argv[2] == "benchmarks.loader":
            argv += ["--micro", "--modalities", "text", "--workers", "0"]
        elif argv[2] in ("benchmarks.e2e_pretrain", "benchmarks.finetune_speed"):
            argv += ["--micro"]
        else:
            raise AssertionError(f"README command {cmd.text!r}: no smoke recipe for {argv[2]} in {__file__}")
    else:
        raise AssertionError(f"README command {cmd.text!r}: no smoke recipe in {__file__}")
    cmd.argv = argv
    return cmd


# ----------------------------------------------------------------------------- inputs the README names


def write_user_inputs(root: Path) -> None:
    """Small stand-ins for the user data the README's commands name."""
    from PIL import Image

    rng = np.random.default_rng(0)
    corpus = root / "corpus"
    corpus.mkdir()
    words = "the a cat dog sat ran on under mat tree river stone quickly slowly red blue green small large".split()
    for i in range(60):
        doc = ". ".join(" ".join(rng.choice(words, size=8)) for _ in range(6)) + "."
        (corpus / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    (corpus / "more.jsonl").write_text("".join(f'{{"text": "json document {i} about a {words[i % 10]}"}}\n'
                                               for i in range(20)), encoding="utf-8")

    photos = root / "photos"
    rows = []
    for cls, hue in (("cats", (200, 60, 40)), ("dogs", (40, 90, 200))):
        (photos / cls).mkdir(parents=True)
        for i in range(30):
            arr = np.clip(np.array(hue) + rng.normal(0, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(photos / cls / f"{i:02d}.png")
            rows.append((f"{cls}/{i:02d}.png", f"a photo of {cls[:-1]} number {i % 5}"))
    with (root / "captions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        w.writerows(rows)
    for rel, _ in rows:
        target = root / "regions" / (rel.rsplit(".", 1)[0] + ".npz")
        target.parent.mkdir(parents=True, exist_ok=True)
        # configs/vl_uniter_base.yaml's detector: 2048-d Faster R-CNN features, 1601 Visual Genome classes
        np.savez(target, features=rng.standard_normal((3, 2048)).astype(np.float32),
                 boxes=np.array([[0, 0, 48, 40], [4, 4, 20, 30], [10, 2, 30, 9]], dtype=np.float32),
                 soft=rng.dirichlet(np.ones(1601), size=3).astype(np.float32))

    records = [(f"contig{i}", "".join(rng.choice(list("ACGT"), size=2_500))) for i in range(1, 41)]
    with gzip.open(root / "genome.fa.gz", "wt") as fh:
        for name, seq in records:
            fh.write(f">{name}\n" + "\n".join(seq[j:j + 60] for j in range(0, len(seq), 60)) + "\n")
    (root / "peaks.bed").write_text("".join(f"contig{i}\t{300 + i * 20}\t{1100 + i * 20}\tpeak\n" for i in range(1, 41)),
                                    encoding="utf-8")

    import soundfile as sf

    for cls, freq in (("low", 220.0), ("high", 880.0)):
        (root / "clips" / cls).mkdir(parents=True)
        for i in range(20):
            t = np.arange(int(16000 * 0.8)) / 16000
            wav = 0.3 * np.sin(2 * np.pi * (freq + 10 * i) * t) + 0.01 * rng.standard_normal(t.size)
            sf.write(root / "clips" / cls / f"{i:02d}.wav", wav.astype(np.float32), 16000)


# ----------------------------------------------------------------------------- the tests


def test_readme_has_the_commands_this_test_runs():
    cmds = readme_commands()
    texts = [c.text for c in cmds]
    assert any("mmm demo" in t for t in texts) and any("-m pytest" in t for t in texts)
    assert any("mmm bench --suite throughput --quick" in t for t in texts)
    assert any("python -m benchmarks.text_mlm_step" in t for t in texts)
    for c in cmds:  # every command has a recipe (a new command without one fails here, not silently)
        smoke(c)


def test_commands_skipped_here_are_listed_with_a_reason():
    skipped = [smoke(c) for c in readme_commands()]
    skipped = [c for c in skipped if c.skip]
    for c in skipped:
        print(f"skipped: {c.text}\n    because {c.skip}")
        assert c.skip
    ran = [c for c in map(smoke, readme_commands()) if not c.skip]
    assert len(ran) >= 20, "the README lost most of its commands?"


def test_every_readme_command_runs_at_smoke_size(tmp_path):
    work = tmp_path / "user"
    work.mkdir()
    write_user_inputs(work)
    (work / "configs").symlink_to(REPO / "configs")
    (work / ".venv").symlink_to(VENV_BIN.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MMM_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MMM_BENCH_MICRO", None)
    failures, seconds = [], []
    for cmd in map(smoke, readme_commands()):
        if cmd.skip:
            continue
        start = time.perf_counter()
        proc = subprocess.run(cmd.argv, cwd=work, env={**env, **cmd.env}, capture_output=True, text=True, timeout=600)
        seconds.append((time.perf_counter() - start, cmd.text))
        if proc.returncode != 0:
            failures.append(f"$ {cmd.text}\n  ran as: {shlex.join(cmd.argv)}\n  exit {proc.returncode}\n"
                            f"{(proc.stdout + proc.stderr)[-3000:]}")
    print("\n".join(f"{t:6.1f} s  {text}" for t, text in sorted(seconds, reverse=True)))  # where the time goes (-s)
    assert not failures, "README commands failed:\n\n" + "\n\n".join(failures)
