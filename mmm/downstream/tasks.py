"""Embedded downstream tasks, built locally with no download.

* ``stdlib-package`` (text, **real data**): docstrings of the Python standard library that runs
  this code, each labelled by the top-level package it comes from (``asyncio``, ``email``, ...).
  The split is by *module*: every module's docstrings go to one split only (train, dev or test),
  so a model cannot score by recognising a module it saw in training.
* Shard-based tasks (image digits, image shapes, DNA motifs, audio sounds) are read from the
  embedded shard sets ``datasets_def`` builds; :func:`balanced_subsample` caps their size. The
  digits are real (scikit-learn's bundled handwritten digits); the rendered shapes, the DNA motif
  genome and the audio sounds are synthetic.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mmm.downstream.data import Split

PACKAGE_CANDIDATES = ("asyncio", "email", "unittest", "xml", "multiprocessing", "importlib", "http", "concurrent",
                      "json", "logging", "urllib", "sqlite3", "ctypes", "idlelib", "tkinter", "lib2to3")
"""Top-level stdlib packages tried, in order; the first :data:`NUM_PACKAGES` with enough modules and docstrings are used."""
NUM_PACKAGES = 6
MIN_MODULES = 3
MIN_CHARS = 40
MAX_CHARS = 400
SPLIT_PATTERN = ("dev", "test", "train", "train", "train")
"""Split of a package's i-th module (ordered by a hash of its name), repeating: each split gets modules of every class."""


def _docstrings(path: Path) -> List[str]:
    """Module, class and function docstrings of one source file (whitespace collapsed, cut to MAX_CHARS)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                text = " ".join(doc.split())
                if len(text) >= MIN_CHARS:
                    out.append(text[:MAX_CHARS])
    return out


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def stdlib_package_task(max_train_per_class: Optional[int] = 150, max_eval_per_class: Optional[int] = 50,
                        stdlib: Optional[Union[str, Path]] = None) -> Dict[str, Split]:
    """The ``stdlib-package`` task: ``{"train", "dev", "test"}`` splits of (docstring, package).

    Args:
        max_train_per_class: cap on training docstrings per package (a seeded choice); None = all.
        max_eval_per_class: cap per package on dev and test.
        stdlib: the standard-library folder (default: this interpreter's).
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    rows: Dict[str, List[Tuple[str, str, str]]] = {s: [] for s in ("train", "dev", "test")}
    used = []
    for pkg in PACKAGE_CANDIDATES:
        d = root / pkg
        if not (d / "__init__.py").is_file():
            continue
        modules = sorted((p for p in d.rglob("*.py") if "test" not in p.relative_to(d).parts[0].lower()
                          or p.parent == d), key=lambda p: _stable(p.relative_to(root).as_posix()))
        docs = {m: _docstrings(m) for m in modules}
        modules = [m for m in modules if docs[m]]
        if len(modules) < MIN_MODULES or sum(len(v) for v in docs.values()) < 30:
            continue
        used.append(pkg)
        for i, m in enumerate(modules):
            split = SPLIT_PATTERN[i % len(SPLIT_PATTERN)]
            rel = m.relative_to(root).with_suffix("").as_posix().replace("/", ".")
            rows[split] += [(doc, pkg, rel) for doc in docs[m]]
        if len(used) == NUM_PACKAGES:
            break
    if len(used) < 2:
        raise RuntimeError(f"{root}: found {len(used)} usable standard-library package(s); the task needs 2")
    out = {}
    for split, items in rows.items():
        cap = max_train_per_class if split == "train" else max_eval_per_class
        items = balanced_rows(items, cap, seed={"train": 0, "dev": 1, "test": 2}[split])
        out[split] = Split(f"stdlib-package:{split}", [t for t, _, _ in items], [p for _, p, _ in items],
                           [f"{mod}#{i}" for i, (_, _, mod) in enumerate(items)])
    return out


def balanced_rows(rows: Sequence[Tuple], cap: Optional[int], seed: int, label_index: int = 1) -> List[Tuple]:
    """At most ``cap`` rows per label (a seeded choice), in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    by: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        by.setdefault(str(r[label_index]), []).append(i)
    keep = []
    for _, idx in sorted(by.items()):
        keep += idx if cap is None or len(idx) <= cap else rng.choice(idx, cap, replace=False).tolist()
    return [rows[i] for i in rng.permutation(keep)]


def balanced_subsample(split: Split, per_class: Optional[int], seed: int = 0) -> Split:
    """At most ``per_class`` samples of each label of ``split`` (seeded), shuffled; None keeps all."""
    rows = list(zip(split.inputs, split.labels, split.where))
    kept = balanced_rows(rows, per_class, seed)
    return Split(split.path, [r[0] for r in kept], [r[1] for r in kept], [r[2] for r in kept], list(split.skipped))


def write_stdlib_task(out_dir: Union[str, Path], **kw) -> Dict[str, Path]:
    """Write the ``stdlib-package`` splits as ``train.tsv``, ``dev.tsv``, ``test.tsv`` (columns
    ``text``, ``label``, ``module``) for ``mmm finetune --text_column text``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, s in stdlib_package_task(**kw).items():
        p = out / f"{name}.tsv"
        lines = ["text\tlabel\tmodule"] + [f"{t.replace(chr(9), ' ')}\t{y}\t{w.split('#')[0]}"
                                          for t, y, w in zip(s.inputs, s.labels, s.where)]
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[name] = p
    return paths
