"""Every command the README shows runs, at smoke size, in a fresh process, in README order.

The commands are read from the README's ``bash`` code blocks, so a command added to or changed in
the README is tested without editing this file; a command this file has no smoke recipe for fails
the test (add a recipe to :func:`smoke`). The shard builders read inputs this test generates under
the names the README uses (``corpus/``, ``photos/``, ``genome.fa.gz``, ``peaks.bed``, ``clips/``,
``captions.csv``, ``regions/``).

Chains: commands that name a common path run one after the other, in README order, in one working
folder, as a user following the README would (``mmm demo`` writes ``runs/demo`` that ``mmm export``
later reads). The paths a command names are read from its command line, its parsed ``mmm``
arguments with their defaults (``mmm demo --out`` is ``runs/demo``) and, for ``pretrain`` and
``prepare``, every path in its resolved config (``trainer.default_root_dir``, ``data.train``,
``model.init_from``, a teacher checkpoint); two commands share a chain when a path of one is, or
lies inside, a path of the other (see :func:`command_paths` and :func:`chains`). Each chain is one
test, in its own folder with its own copy of the inputs, so independent chains run in parallel
under pytest-xdist, and a dependency the grouping missed fails (the file is not there) instead of
racing. The embedded-data cache is the pytest worker's (``$MMM_CACHE_DIR`` of the session).

Smoke size: training commands get ``--trainer.max_steps 2`` (a resume gets 4), fine-tuning one seed of
4 steps, benchmarks their
``micro`` sizes (``$MMM_BENCH_MICRO``), and the GPU presets are shrunk to a 1-block CPU model on
the same shards (their ``bf16``/multi-GPU trainer settings replaced); a ``torchrun``/``srun``
launch runs its ``mmm pretrain`` as one CPU process on the text shards the README built. Commands
that cannot run here (the test suite itself) are listed with the reason by
:func:`test_commands_skipped_here_are_listed_with_a_reason`. Each command's wall and CPU seconds
are recorded (``readme_seconds``) and the slowest are listed at the end of the run (``conftest.py``).
"""
from __future__ import annotations

import csv
import gzip
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterator, List, Optional, Set

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


def _without_plugin_options(args: List[str]) -> Iterator[str]:
    """``args`` without the ``--plugin MODULE`` pairs that may come before the command."""
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--plugin":
            skip = True
        elif not a.startswith("--plugin="):
            yield a


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
        sub = next(a for a in _without_plugin_options(argv[1:]))  # `mmm --plugin M list ...`: the command is list
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
        elif sub == "check-syncs":
            argv += ["--data.batch_size", "4", "--data.num_workers", "0"]
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


# ----------------------------------------------------------------------------- chains of dependent commands

USER_INPUTS = ("corpus", "photos", "captions.csv", "regions", "genome.fa.gz", "peaks.bed", "clips")
"""What :func:`write_user_inputs` writes: read by commands, written by none, so naming one joins no chain."""
_RELATIVE_PATH = re.compile(r"^[\w.\-]+(?:/[\w.\-]+)*/?$")


def _strings(value: Any) -> Iterator[str]:
    """Every string inside nested dicts, lists and tuples."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _mmm_strings(argv: List[str]) -> List[str]:
    """The string values of an ``mmm`` command's parsed arguments (defaults included) and, for ``pretrain`` and
    ``prepare``, of its resolved config. A command that does not parse names nothing more (it fails when it runs)."""
    from mmm.cli import build_parser, parse_overrides
    from mmm.config import load_config, to_dict

    try:
        ns, rest = build_parser().parse_known_args(argv[1:])
    except SystemExit:
        return []
    out = [v for k, v in vars(ns).items() if k != "fn"]
    if ns.command in ("pretrain", "prepare") and not getattr(ns, "print_config", False):
        try:  # the README's configs/... are relative to the working folder, where configs/ is the repository's
            config = None if ns.config is None else REPO / ns.config
            out += _strings(to_dict(load_config(config, parse_overrides(rest))))
        except Exception:  # noqa: BLE001 - a config that does not load fails the command itself, with its message
            pass
    return list(_strings(out))


def command_paths(cmd: Command) -> Set[PurePosixPath]:
    """The working-folder paths ``cmd`` names: relative paths with a ``/`` (``runs/demo``, ``shards/text/``,
    ``runs/text_mlm_tiny/checkpoints/last.ckpt``) from its command line and, for ``mmm``, its parsed arguments and
    resolved config (:func:`_mmm_strings`); ``configs/`` and the inputs (read, never written) are left out."""
    strings = list(cmd.argv[1:])
    if cmd.argv[0].endswith("mmm"):
        strings += _mmm_strings(cmd.argv)
    out = set()
    for s in strings:
        if "/" not in s or not _RELATIVE_PATH.match(s) or s.startswith(("./", "../")):
            continue
        path = PurePosixPath(s)
        if path.parts[0] not in ("configs", ".venv", "tests") + USER_INPUTS:
            out.add(path)
    return out


def _overlap(a: Set[PurePosixPath], b: Set[PurePosixPath]) -> bool:
    return any(x == y or x in y.parents or y in x.parents for x in a for y in b)


@dataclass
class Chain:
    """Commands that share a path, in README order; one test runs them in one folder."""

    commands: List[Command]
    paths: Set[PurePosixPath]

    @property
    def name(self) -> str:
        """A test id: the first command's program, sub-command and preset (``mmm-pretrain-text_mlm_tiny``)."""
        argv = self.commands[0].argv
        words = [Path(argv[0]).name] + [w for w in argv[1:3] if not w.startswith("-") and "/" not in w]
        return "-".join(words + [Path(w).stem for w in argv if w.endswith(".yaml")][:1])


def chains(commands: List[Command]) -> List[Chain]:
    """``commands`` (smoke forms, skipped ones left out) grouped so that two commands whose paths overlap
    (:func:`command_paths`: the same path, or one inside the other) are in one chain, each chain in README
    order; chains ordered by their first command."""
    groups: List[Chain] = []
    for cmd in commands:
        paths = command_paths(cmd)
        joined = [g for g in groups if _overlap(g.paths, paths)]
        merged = Chain([c for g in joined for c in g.commands] + [cmd], set(paths).union(*(g.paths for g in joined)))
        merged.commands.sort(key=commands.index)
        groups = [g for g in groups if not any(g is j for j in joined)] + [merged]
    groups.sort(key=lambda g: commands.index(g.commands[0]))
    return groups


def readme_chains() -> List[Chain]:
    return chains([c for c in map(smoke, readme_commands()) if not c.skip])


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


README_CHAINS = readme_chains()


def _smoke_lines(tmp_path: Path, *lines: str) -> List[Command]:
    readme = tmp_path / "README.md"
    readme.write_text("```bash\n" + "\n".join(lines) + "\n```\n", encoding="utf-8")
    return [smoke(c) for c in readme_commands(readme)]


def test_chains_join_commands_that_name_a_common_path(tmp_path):
    cmds = _smoke_lines(
        tmp_path,
        ".venv/bin/mmm demo",                                                       # writes runs/demo (--out default)
        ".venv/bin/mmm pretrain --config configs/text_mlm_tiny.yaml",               # runs/text_mlm_tiny (its config)
        ".venv/bin/mmm pretrain --config configs/text_electra_tiny.yaml",           # runs/text_electra_tiny
        ".venv/bin/mmm shards build photos/ shards/images --dataset image --labels folders",
        ".venv/bin/mmm export hf runs/demo/text/run/checkpoints/last.ckpt exported/",  # inside runs/demo
        ".venv/bin/mmm pretrain --config configs/text_distill_tiny.yaml",           # its config reads runs/text_mlm_tiny
        ".venv/bin/mmm embed runs/demo/image/run/checkpoints/last.ckpt shards/images feats --modality image",
    )
    texts = [c.text for c in cmds]
    # embed joins the demo's chain (runs/demo/...) and the image shards' chain (shards/images)
    assert [[texts.index(c.text) for c in ch.commands] for ch in chains(cmds)] == [[0, 3, 4, 6], [1, 5], [2]]


def test_command_paths_leave_out_inputs_configs_and_option_values(tmp_path):
    build, resume = _smoke_lines(tmp_path, ".venv/bin/mmm shards build corpus/ shards/text --val_fraction 0.01",
                                 ".venv/bin/mmm pretrain --config configs/text_mlm_tiny.yaml --trainer.ckpt_path last")
    assert command_paths(build) == {PurePosixPath("shards/text")}
    assert PurePosixPath("runs/text_mlm_tiny") in command_paths(resume)
    assert not any(p.parts[0] in ("configs", "corpus") for p in command_paths(resume) | command_paths(build))


def test_every_readme_command_is_in_one_chain_in_readme_order():
    ran = [c for c in map(smoke, readme_commands()) if not c.skip]
    listed = [c.text for ch in README_CHAINS for c in ch.commands]
    assert sorted(listed) == sorted(c.text for c in ran)
    order = [c.text for c in ran]
    for ch in README_CHAINS:
        positions = [order.index(c.text) for c in ch.commands]
        assert positions == sorted(positions), ch.name
    for a, b in ((x, y) for i, x in enumerate(README_CHAINS) for y in README_CHAINS[i + 1:]):
        assert not _overlap(a.paths, b.paths), (a.name, b.name)




@pytest.fixture(scope="module")
def user_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme_inputs")
    write_user_inputs(root)
    return root


def _run(cmd: Command, cwd: Path, env: Dict[str, str]):
    """Run ``cmd``; its process, wall seconds and CPU seconds (its own and its waited-for children's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd.argv, cwd=cwd, env={**env, **cmd.env}, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize("chain", README_CHAINS, ids=[f"{i:02d}-{c.name}" for i, c in enumerate(README_CHAINS)])
def test_every_readme_command_runs_at_smoke_size(chain, user_inputs, tmp_path, record_property):
    work = tmp_path / "user"
    shutil.copytree(user_inputs, work)
    (work / "configs").symlink_to(REPO / "configs")
    (work / "tests").symlink_to(REPO / "tests")  # the toy plug-in of `mmm --plugin tests/test_toy_modality.py`
    (work / ".venv").symlink_to(VENV_BIN.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # $MMM_CACHE_DIR: the session's (conftest)
    env.pop("MMM_BENCH_MICRO", None)
    failures, seconds = [], []
    for cmd in chain.commands:
        proc, wall, cpu = _run(cmd, work, env)
        seconds.append((round(wall, 1), round(cpu, 1), cmd.text))
        if proc.returncode != 0:
            failures.append(f"$ {cmd.text}\n  ran as: {shlex.join(cmd.argv)}\n  exit {proc.returncode}\n"
                            f"{(proc.stdout + proc.stderr)[-3000:]}")
    record_property("readme_seconds", seconds)  # listed, slowest first, at the end of the run (conftest.py)
    assert not failures, "README commands failed:\n\n" + "\n\n".join(failures)
